"""4-bit (NF4/FP4) blockwise quantization on CPU: against a plain-torch reference of the format
(tests/reference.py), against bitsandbytes 0.50.2 as the oracle of the format (packed codes, absmax
and codebooks bit-equal; its dequantized values are recorded, not trusted), and every bad input
refused before native code runs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kbit import KbitNativeError
from kbit import functional as F
from reference import dequantize_4bit, quantize_4bit, record_peer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]
KBIT_QUANT = {"fp4": 0, "nf4": 1}  # kbit.h's KBIT_QUANT_*


def sizes(blocksize: int) -> list[int]:
    # odd n, one value, a partial last block, exact blocks
    return [1, 7, blocksize - 1, blocksize, 2 * blocksize, 3 * blocksize + 5]


# --- codebooks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_codebook_equals_bitsandbytes(quant_type: str) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    code = F.get_4bit_code(quant_type)
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, bnb_f.get_4bit_type(quant_type, device="cpu"))


def test_codebook_shapes() -> None:
    nf4, fp4 = F.get_4bit_code("nf4"), F.get_4bit_code("fp4")
    assert bool((nf4[1:] > nf4[:-1]).all()) and nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    assert torch.equal(fp4[8:], -fp4[:8]) and float(fp4.abs().max()) == 1.0
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        F.get_4bit_code("int4")


# --- against the reference and bitsandbytes ------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_reference(quant_type: str, dtype: torch.dtype, blocksize: int) -> None:
    gen = torch.Generator().manual_seed(blocksize)
    for n in sizes(blocksize):
        A = (torch.randn(n, generator=gen) * 3).to(dtype)
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        ref_packed, ref_absmax = quantize_4bit(A, blocksize, quant_type)
        assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
        assert torch.equal(state.absmax, ref_absmax)
        assert torch.equal(packed, ref_packed)
        out = F.dequantize_4bit(packed, state)
        assert out.dtype == dtype and out.shape == A.shape
        assert torch.equal(out, dequantize_4bit(packed, state.absmax, n, blocksize, quant_type, dtype))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_bitsandbytes(quant_type: str, dtype: torch.dtype, blocksize: int) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(1000 + blocksize)
    for n in [*sizes(blocksize), 20001]:
        A = torch.randn(n, generator=gen).to(dtype)
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        bnb_packed, bnb_state = bnb_f.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(packed, bnb_packed)
        assert torch.equal(state.absmax, bnb_state.absmax)
        assert torch.equal(state.code, bnb_state.code)
        expected = dequantize_4bit(packed, state.absmax, n, blocksize, quant_type, dtype)
        assert torch.equal(F.dequantize_4bit(packed, state), expected)
        # bitsandbytes' CPU kernel returns (1, n) for an even 1-D n; the values are what is compared.
        record_peer(f"dequantize_4bit({quant_type}, {dtype}, blocksize {blocksize})",
                    bnb_f.dequantize_4bit(bnb_packed, bnb_state), expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_edge_values_match_bitsandbytes(quant_type: str) -> None:
    """NaN, inf, zeros, subnormals, ties at the midpoints: kbit.h's documented behaviour, the format as
    bitsandbytes writes it."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    code = F.get_4bit_code(quant_type)
    s = code.sort().values
    mids = ((s[1:] + s[:-1]) / 2).tolist()
    cases = [
        torch.tensor([0.0, 1e-30, -1e-30, -0.0, 1.0, float("nan"), 0.5, 0.25] * 9),
        torch.tensor([0.0, float("inf"), 2.0, -float("inf")] * 30),
        torch.zeros(70),
        torch.zeros(128),
        torch.tensor([1e-39, -3e-39] * 40),
        torch.randn(64 * 5 + 1, generator=torch.Generator().manual_seed(2)) * 1e-37,
        torch.tensor([*mids, 1.0] * 4 + [-1.0]),  # exact midpoints: ties go to the lower entry
    ]
    for A in cases:
        packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
        bnb_packed, bnb_state = bnb_f.quantize_4bit(A, blocksize=64, quant_type=quant_type)
        assert torch.equal(packed, bnb_packed)
        assert torch.allclose(state.absmax, bnb_state.absmax, rtol=0, atol=0, equal_nan=True)
        ref_packed, ref_absmax = quantize_4bit(A, 64, quant_type)
        assert torch.equal(packed, ref_packed)
        assert torch.allclose(state.absmax, ref_absmax, rtol=0, atol=0, equal_nan=True)
        expected = dequantize_4bit(packed, state.absmax, A.numel(), 64, quant_type, A.dtype)
        ours = F.dequantize_4bit(packed, state).reshape(-1)
        assert torch.allclose(ours, expected, rtol=0, atol=0, equal_nan=True)
        record_peer(f"dequantize_4bit({quant_type}) of edge values", bnb_f.dequantize_4bit(bnb_packed, bnb_state),
                    expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nan_block_and_zero_block(quant_type: str) -> None:
    A = torch.zeros(128)
    A[70] = float("nan")
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
    assert float(state.absmax[0]) == 0.0 and math.isnan(float(state.absmax[1]))
    one = int((F.get_4bit_code(quant_type) == 1.0).nonzero()[0])
    zero = int((F.get_4bit_code(quant_type) == 0.0).nonzero()[0])
    assert bool((packed[32:] == (one << 4 | one)).all())  # every value of the NaN block: the code of +1
    assert bool((packed[:32] == (zero << 4 | zero)).all())
    assert bool((F.dequantize_4bit(packed, state)[:64] == 0).all())


def test_shapes_and_out() -> None:
    A = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(4))
    packed, state = F.quantize_4bit(A, blocksize=32, quant_type="fp4")
    assert packed.shape == (53, 1) and state.shape == A.shape and state.dtype == torch.float32
    assert state.blocksize == 32 and state.quant_type == "fp4" and state.absmax.shape == (4,)
    out = torch.full_like(A, float("nan"))
    assert F.dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(quant_type: str, dtype: torch.dtype) -> None:
    blocksize = 64
    A = (torch.randn(10 * blocksize + 7, generator=torch.Generator().manual_seed(7)) * 10).to(dtype)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    out = F.dequantize_4bit(packed, state)
    s = state.code.sort().values
    half_gap = float((s[1:] - s[:-1]).max()) / 2
    scale = state.absmax.repeat_interleave(blocksize)[: A.numel()]
    err = (out.float() - A.float()).abs()
    assert bool((err <= scale * (half_gap + torch.finfo(dtype).eps) + 1e-30).all())


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32),
                       min_size=1, max_size=300),
       blocksize=st.sampled_from(BLOCKSIZES[:3]), quant_type=st.sampled_from(QUANT_TYPES))
def test_reference_property(values: list[float], blocksize: int, quant_type: str) -> None:
    A = torch.tensor(values, dtype=torch.float32)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    ref_packed, ref_absmax = quantize_4bit(A, blocksize, quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_absmax)


# --- bad inputs never reach native code -------------------------------------------------------------

GOOD = torch.randn(300)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"A": torch.arange(300, dtype=torch.int32)}, TypeError, "torch.float32, torch.float16 or torch.bfloat16"),
        ({"A": torch.randn(300, dtype=torch.float64)}, TypeError, "got torch.float64"),
        ({"A": [1.0, 2.0]}, TypeError, "must be a torch.Tensor"),
        ({"blocksize": 100}, ValueError, "32, 64, 128, 256, 512, 1024, 2048, 4096"),
        ({"blocksize": 16}, ValueError, "blocksize must be one of"),
        ({"blocksize": 8192}, ValueError, "blocksize must be one of"),
        ({"blocksize": 64.0}, ValueError, "blocksize must be one of"),
        ({"blocksize": True}, ValueError, "blocksize must be one of"),
        ({"quant_type": "int4"}, ValueError, "quant_type must be 'nf4' or 'fp4'"),
        ({"quant_type": "NF4"}, ValueError, "quant_type must be 'nf4' or 'fp4'"),
        ({"quant_type": 1}, ValueError, "quant_type must be 'nf4' or 'fp4'"),
        ({"A": torch.randn(20, 30).t()}, ValueError, "call A.contiguous()"),
        ({"A": torch.randn(0)}, ValueError, "empty"),
        ({"A": torch.randn(300, device="meta")}, ValueError, "CPU and CUDA tensors only"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_quantize_rejects(no_native, kwargs, error, message) -> None:
    args = {"A": GOOD, "blocksize": 64, "quant_type": "nf4", **kwargs}
    with pytest.raises(error) as info:
        F.quantize_4bit(**args)
    assert message in str(info.value)


def _state(**changes):
    fields = {"absmax": torch.ones(5), "shape": torch.Size([300]), "dtype": torch.float32, "blocksize": 64,
              "quant_type": "nf4", "code": F.get_4bit_code("nf4")}
    fields.update(changes)
    return F.QuantState4bit(**fields)


U8 = torch.zeros(150, 1, dtype=torch.uint8)


@pytest.mark.parametrize(
    "packed,state,out,error,message",
    [
        (torch.zeros(150, 1), _state(), None, TypeError, "packed must be torch.uint8"),
        ([0] * 150, _state(), None, TypeError, "packed must be a torch.Tensor"),
        (U8, object(), None, TypeError, "state must be a QuantState4bit"),
        (U8, _state(dtype=torch.int8), None, TypeError, "state.dtype must be"),
        (U8, _state(blocksize=100), None, ValueError, "blocksize must be one of"),
        (U8, _state(quant_type="int4"), None, ValueError, "quant_type must be 'nf4' or 'fp4'"),
        (torch.zeros(151, 1, dtype=torch.uint8), _state(), None, ValueError, "state.shape (300,) needs 150"),
        (torch.zeros(0, 1, dtype=torch.uint8), _state(), None, ValueError, "empty"),
        (torch.zeros(300, 1, dtype=torch.uint8)[::2], _state(), None, ValueError, "call packed.contiguous()"),
        (U8, _state(absmax=torch.ones(4)), None, ValueError, "must hold 5 float32"),
        (U8, _state(absmax=torch.ones(5, dtype=torch.float16)), None, ValueError, "must hold 5 float32"),
        (U8, _state(absmax=torch.ones(5, device="meta")), None, ValueError,
         "state.absmax is on meta but packed is on cpu"),
        (U8, _state(), torch.empty(299), ValueError, "out must be torch.float32 of shape (300,)"),
        (U8, _state(), torch.empty(300, dtype=torch.float16), ValueError, "out must be torch.float32"),
        (U8, _state(), torch.empty(300, device="meta"), ValueError, "out is on meta but packed is on cpu"),
        (U8, _state(shape=torch.Size([20, 15])), torch.empty(15, 20).t(), ValueError, "call out.contiguous()"),
        (torch.zeros(150, 1, dtype=torch.uint8, device="meta"), _state(absmax=torch.ones(5, device="meta")), None,
         ValueError, "CPU and CUDA tensors only"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_dequantize_rejects(no_native, packed, state, out, error, message) -> None:
    with pytest.raises(error) as info:
        F.dequantize_4bit(packed, state, out=out)
    assert message in str(info.value)


# --- the C ABI's own checks -------------------------------------------------------------------------


def test_native_checks(fresh_native) -> None:
    lib = fresh_native.cpu_library()
    A = torch.randn(100)
    out, absmax = torch.empty(50, dtype=torch.uint8), torch.empty(4)
    ptrs = (A.data_ptr(), out.data_ptr(), absmax.data_ptr())
    for dtype, quant_type, n, blocksize, status in [
        (0, 1, 100, 48, 3),   # blocksize not a power of two
        (0, 1, 100, 16, 3),   # below KBIT_BLOCKWISE4_MIN_BLOCKSIZE
        (0, 1, 100, 8192, 3),
        (5, 1, 100, 32, 2),   # dtype
        (0, 2, 100, 32, 6),   # quant type
        (0, 1, -1, 32, 1),    # negative n
    ]:
        with pytest.raises(KbitNativeError) as info:
            lib.quantize_4bit(dtype, quant_type, *ptrs, n, blocksize, None)
        assert info.value.status == status
        with pytest.raises(KbitNativeError) as info:
            lib.dequantize_4bit(dtype, quant_type, ptrs[1], ptrs[2], ptrs[0], n, blocksize, None)
        assert info.value.status == status
    assert "quant type" in lib.status_string(6)
    with pytest.raises(KbitNativeError) as info:
        lib.quantize_4bit(0, 1, None, *ptrs[1:], 100, 32, None)
    assert info.value.status == 1
    lib.quantize_4bit(0, 1, None, None, None, 0, 32, None)  # n == 0: nothing to do, OK
    lib.dequantize_4bit(0, 0, None, None, None, 0, 32, None)


def test_many_threads_match_one(fresh_native, monkeypatch) -> None:
    A = torch.randn(1 << 18, generator=torch.Generator().manual_seed(9))
    monkeypatch.setenv("KBIT_NUM_THREADS", "1")
    p1, s1 = F.quantize_4bit(A, blocksize=64)
    d1 = F.dequantize_4bit(p1, s1)
    monkeypatch.setenv("KBIT_NUM_THREADS", "5")
    p5, s5 = F.quantize_4bit(A, blocksize=64)
    assert torch.equal(p1, p5) and torch.equal(s1.absmax, s5.absmax)
    assert torch.equal(d1, F.dequantize_4bit(p5, s5))


# --- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_cuda_matches_cpu(quant_type: str, dtype: torch.dtype, blocksize: int) -> None:
    for n in [1, 3 * blocksize + 5, 2 * blocksize]:
        A = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype)
        A[n // 2] = float("nan") if n > 100 else A[n // 2]
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        gpacked, gstate = F.quantize_4bit(A.cuda(), blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(gpacked.cpu(), packed)
        assert torch.allclose(gstate.absmax.cpu(), state.absmax, rtol=0, atol=0, equal_nan=True)
        assert torch.allclose(F.dequantize_4bit(gpacked, gstate).cpu(), F.dequantize_4bit(packed, state),
                              rtol=0, atol=0, equal_nan=True)
