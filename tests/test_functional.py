"""8-bit blockwise quantization on CPU: against a plain-torch reference of the format (tests/reference.py),
against bitsandbytes 0.50.2 as the oracle of the format (codes, absmax; its dequantized values are
recorded, not trusted), and every bad input refused before native code runs."""

from __future__ import annotations

import math

import kbit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kbit import KbitNativeError, KbitNoBackendError, _ops
from kbit import functional as F
from reference import GRID_HALF_SPAN, dequantize_blockwise, quantize_blockwise, record_peer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
def sizes(blocksize: int) -> list[int]:
    return [1, blocksize - 1, blocksize, 2 * blocksize + 3]  # partial last blocks included


# --- codebook ---------------------------------------------------------------------------------------


def test_dynamic_map_shape_and_order() -> None:
    code = F.create_dynamic_map()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] >= code[:-1]).all())
    assert code[0] > -1 and code[-1] == 1.0 and bool((code == 0).any())
    assert kbit.functional is F  # the lazy attribute is the module


def test_dynamic_map_unsupported_layout() -> None:
    with pytest.raises(ValueError, match="only the full 8-bit map"):
        F.create_dynamic_map(max_exponent_bits=4)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed: bool) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(F.create_dynamic_map(signed=signed), bnb_f.create_dynamic_map(signed=signed))


# --- against the reference and bitsandbytes ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_reference(dtype: torch.dtype, blocksize: int) -> None:
    gen = torch.Generator().manual_seed(blocksize)
    code = F.create_dynamic_map()
    for n in sizes(blocksize):
        A = (torch.randn(n, generator=gen) * 3).to(dtype)
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        ref_codes, ref_absmax = quantize_blockwise(A, code, blocksize)
        assert torch.equal(state.absmax, ref_absmax)
        assert torch.equal(codes, ref_codes)
        out = F.dequantize_blockwise(codes, state)
        assert out.dtype == dtype and out.shape == A.shape
        assert torch.equal(out, dequantize_blockwise(codes, code, state.absmax, blocksize, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_bitsandbytes(dtype: torch.dtype, blocksize: int) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(1000 + blocksize)
    for n in sizes(blocksize):
        A = torch.randn(n, generator=gen).to(dtype)
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        bnb_codes, bnb_state = bnb_f.quantize_blockwise(A, blocksize=blocksize)
        assert torch.equal(codes, bnb_codes)
        assert torch.equal(state.absmax, bnb_state.absmax)
        expected = dequantize_blockwise(codes, state.code, state.absmax, blocksize, dtype)
        assert torch.equal(F.dequantize_blockwise(codes, state), expected)
        record_peer("dequantize_blockwise", bnb_f.dequantize_blockwise(bnb_codes, bnb_state), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(dtype: torch.dtype) -> None:
    blocksize = 256
    A = (torch.randn(10 * blocksize + 7, generator=torch.Generator().manual_seed(7)) * 10).to(dtype)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    out = F.dequantize_blockwise(codes, state)
    code = state.code
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    eps = torch.finfo(dtype).eps
    scale = state.absmax.repeat_interleave(blocksize)[: A.numel()]
    err = (out.float() - A.float()).abs()
    assert bool((err <= scale * (half_gap + eps) + 1e-30).all())


def test_shapes_zero_blocks_and_out() -> None:
    A = torch.zeros(3, 5, 70)
    A[2] = torch.linspace(-4, 4, 350).reshape(5, 70)
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert codes.shape == A.shape and codes.dtype == torch.uint8
    assert state.absmax.shape == (math.ceil(A.numel() / 64),) and state.shape == A.shape
    assert float(state.absmax[0]) == 0.0
    # A block whose absmax is 0 dequantizes to zeros. (Its codes are what bitsandbytes gives: 0/0 is
    # NaN, which snaps to grid point -1, i.e. code 0; kbit.h says "the entry nearest to 0".)
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(codes, bnb_f.quantize_blockwise(A, blocksize=64)[0])
    out = torch.full_like(A, float("nan"))
    assert F.dequantize_blockwise(codes, state, out=out) is out
    assert bool((out[0] == 0).all())


def test_custom_code() -> None:
    code = torch.linspace(-1, 1, 256)
    A = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    codes, state = F.quantize_blockwise(A, code=code, blocksize=128)
    assert state.code is code
    assert torch.equal(codes, quantize_blockwise(A, code, 128)[0])


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-2.0**100, 2.0**100, allow_nan=False, width=32), min_size=1, max_size=300),
       blocksize=st.sampled_from(BLOCKSIZES[:3]))
def test_nearest_code_property(values: list[float], blocksize: int) -> None:
    A = torch.tensor(values, dtype=torch.float32)
    code = F.create_dynamic_map()
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    _, ref_absmax = quantize_blockwise(A, code, blocksize)
    assert torch.equal(state.absmax, ref_absmax)
    scale = ref_absmax.repeat_interleave(blocksize)[: A.numel()]
    normed = torch.where(scale > 0, A / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(A))
    dist = (normed[:, None] - code[None, :]).abs()
    chosen = dist.gather(1, codes.long()[:, None])[:, 0]
    # x is first snapped to a grid point p at most one grid step away, so the chosen entry (nearest
    # to p) is at most two steps farther from x than the entry nearest to x (triangle inequality).
    # (All-zero blocks are covered by test_shapes_zero_blocks_and_out.)
    ok = chosen <= dist.min(dim=1).values + 2 / GRID_HALF_SPAN + 1e-6
    assert bool(ok[scale > 0].all())


# --- bad inputs never reach native code -------------------------------------------------------------

GOOD = torch.randn(300)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"A": torch.arange(300, dtype=torch.int32)}, TypeError, "torch.float32, torch.float16 or torch.bfloat16"),
        ({"A": torch.randn(300, dtype=torch.float64)}, TypeError, "got torch.float64"),
        ({"A": [1.0, 2.0]}, TypeError, "must be a torch.Tensor"),
        ({"blocksize": 100}, ValueError, "64, 128, 256, 512, 1024, 2048, 4096"),
        ({"blocksize": 32}, ValueError, "blocksize must be one of"),
        ({"blocksize": 8192}, ValueError, "blocksize must be one of"),
        ({"blocksize": 256.0}, ValueError, "blocksize must be one of"),
        ({"blocksize": True}, ValueError, "blocksize must be one of"),
        ({"A": torch.randn(20, 30).t()}, ValueError, "call A.contiguous()"),
        ({"A": torch.randn(0)}, ValueError, "empty"),
        ({"A": torch.randn(300, device="meta")}, ValueError, "CPU and CUDA tensors only"),
        ({"code": torch.randn(255)}, ValueError, "256 float32 values"),
        ({"code": torch.randn(256, dtype=torch.float64)}, ValueError, "256 float32 values"),
        ({"code": torch.linspace(1, -1, 256)}, ValueError, "sorted ascending"),
        ({"code": torch.linspace(-1, 1, 512)[::2]}, ValueError, "call code.contiguous()"),
        ({"code": torch.linspace(-1, 1, 256, device="meta")}, ValueError, "code is on meta but A is on cpu"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_quantize_rejects(no_native, kwargs, error, message) -> None:
    args = {"A": GOOD, "code": None, "blocksize": 64, **kwargs}
    with pytest.raises(error) as info:
        F.quantize_blockwise(**args)
    assert message in str(info.value)


def _state(**changes):
    fields = {"absmax": torch.ones(5), "code": F.create_dynamic_map(), "blocksize": 64, "dtype": torch.float32,
              "shape": torch.Size([300])}
    fields.update(changes)
    return F.QuantState8bit(**fields)


@pytest.mark.parametrize(
    "codes,state,out,error,message",
    [
        (torch.zeros(300), _state(), None, TypeError, "codes must be torch.uint8"),
        (torch.zeros(300, dtype=torch.uint8), object(), None, TypeError, "state must be a QuantState8bit"),
        (torch.zeros(300, dtype=torch.uint8), _state(dtype=torch.int8), None, TypeError, "state.dtype must be"),
        (torch.zeros(300, dtype=torch.uint8), _state(blocksize=100), None, ValueError, "blocksize must be one of"),
        (torch.zeros(301, dtype=torch.uint8), _state(), None, ValueError, "state.shape (300,) needs 300"),
        (torch.zeros(0, dtype=torch.uint8), _state(), None, ValueError, "empty"),
        (torch.zeros(600, dtype=torch.uint8)[::2], _state(), None, ValueError, "call codes.contiguous()"),
        (torch.zeros(300, dtype=torch.uint8), _state(absmax=torch.ones(4)), None, ValueError, "must hold 5 float32"),
        (torch.zeros(300, dtype=torch.uint8), _state(absmax=torch.ones(5, dtype=torch.float16)), None, ValueError,
         "must hold 5 float32"),
        (torch.zeros(300, dtype=torch.uint8), _state(absmax=torch.ones(5, device="meta")), None, ValueError,
         "state.absmax is on meta but codes is on cpu"),
        (torch.zeros(300, dtype=torch.uint8), _state(code=torch.ones(256, device="meta")), None, ValueError,
         "code is on meta but codes is on cpu"),
        (torch.zeros(300, dtype=torch.uint8), _state(), torch.empty(299), ValueError, "out must be torch.float32 of shape (300,)"),
        (torch.zeros(300, dtype=torch.uint8), _state(), torch.empty(300, dtype=torch.float16), ValueError,
         "out must be torch.float32"),
        (torch.zeros(300, dtype=torch.uint8), _state(), torch.empty(300, device="meta"), ValueError,
         "out is on meta but codes is on cpu"),
        (torch.zeros(300, dtype=torch.uint8), _state(shape=torch.Size([20, 15])), torch.empty(15, 20).t(), ValueError,
         "call out.contiguous()"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_dequantize_rejects(no_native, codes, state, out, error, message) -> None:
    if codes.numel() == 300 and state is not None and isinstance(state, F.QuantState8bit) and state.shape != (300,):
        codes = codes.reshape(state.shape)
    with pytest.raises(error) as info:
        F.dequantize_blockwise(codes, state, out=out)
    assert message in str(info.value)


def test_native_status_is_a_typed_error(fresh_native) -> None:
    lib = fresh_native.cpu_library()
    A, code = torch.randn(100), F.create_dynamic_map()
    out, absmax = torch.empty(100, dtype=torch.uint8), torch.empty(2)
    with pytest.raises(KbitNativeError) as info:  # blocksize 100: only the native check stands in the way
        lib.quantize_blockwise_8bit(0, A.data_ptr(), code.data_ptr(), out.data_ptr(), absmax.data_ptr(), 100, 100, None)
    assert isinstance(info.value, RuntimeError) and info.value.status == 3
    assert "kbit_quantize_blockwise_8bit failed with status 3" in str(info.value)
    assert info.value.message == lib.status_string(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_tensor_without_cuda_library_says_why(fresh_native, monkeypatch) -> None:
    monkeypatch.setenv("KBIT_BACKEND", "cpu")
    with pytest.raises(KbitNoBackendError, match="cannot run on cuda:0: KBIT_BACKEND=cpu"):
        _ops._library(torch.device("cuda", 0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_cuda_matches_cpu(dtype: torch.dtype, blocksize: int) -> None:
    A = torch.randn(3 * blocksize + 5, generator=torch.Generator().manual_seed(5)).to(dtype)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    gcodes, gstate = F.quantize_blockwise(A.cuda(), blocksize=blocksize)
    assert torch.equal(gcodes.cpu(), codes) and torch.equal(gstate.absmax.cpu(), state.absmax)
    assert torch.equal(F.dequantize_blockwise(gcodes, gstate).cpu(), F.dequantize_blockwise(codes, state))
