"""Bad input to every public entry point (issue item 6): a clear TypeError/ValueError before native
code runs; element counts >= 2^31 work; NaN/inf have the documented results.

Policy (README, API): the functional API and the kbit:: ops refuse non-contiguous tensors (call
.contiguous()); Linear4bit and the optimizers, which own their tensors, make them contiguous."""

from __future__ import annotations

import ctypes
import dataclasses
import math

import pytest
import torch
from kbit import functional as F
from kbit import nn as knn
from kbit import optim as ko
from machine import require_memory

W = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
PACKED, STATE = F.quantize_4bit(W, blocksize=64)
NPACKED, NSTATE = F.quantize_4bit(W, blocksize=64, compress_statistics=True)
X = torch.randn(80)


# --- gemv_4bit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((X.double(), PACKED, STATE), TypeError, "A must be torch.float32, torch.float16 or torch.bfloat16"),
        ((X.half(), PACKED, STATE, torch.zeros(48)), ValueError, "bias must hold 48 values of A's dtype"),
        ((X, PACKED, STATE, torch.zeros(47)), ValueError, "bias must hold 48 values"),
        ((torch.randn(79), PACKED, STATE), ValueError, "A must have shape (..., 80) with one row"),
        ((torch.randn(2, 80), PACKED, STATE), ValueError, "use matmul_4bit for more rows"),
        ((torch.tensor(1.0), PACKED, STATE), ValueError, "A must have shape (..., 80)"),
        ((torch.randn(160)[::2], PACKED, STATE), ValueError, "call A.contiguous()"),
        ((X, PACKED, STATE, torch.zeros(96)[::2]), ValueError, "call bias.contiguous()"),
        ((X, PACKED.float(), STATE), TypeError, "B must be torch.uint8"),
        ((X, PACKED[:-1], STATE), ValueError, "B has 1919 bytes but state.shape (48, 80) needs 1920"),
        ((X, PACKED.reshape(-1)[::2], F.quantize_4bit(W[:24])[1]), ValueError, "call B.contiguous()"),
        ((X, F.quantize_4bit(W.reshape(-1))[0], F.quantize_4bit(W.reshape(-1))[1]), ValueError,
         "quant_state.shape must be (n_out, k_in)"),
        ((X, PACKED, "state"), TypeError, "state must be a QuantState4bit"),
        ((X.to("meta"), PACKED, STATE), ValueError, "A is on meta but B is on cpu"),
        ((X, PACKED, STATE, torch.zeros(48, device="meta")), ValueError, "bias is on meta but B is on cpu"),
        ((X, PACKED, STATE.to("meta")), ValueError, "state.absmax is on meta but B is on cpu"),
        ((X, NPACKED, NSTATE.to("meta")), ValueError, "state.offset is on meta but B is on cpu"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_gemv_rejects(no_native, args, error, message) -> None:
    with pytest.raises(error) as info:
        F.gemv_4bit(*args)
    assert message in str(info.value)


# --- nested states that do not match -------------------------------------------------------------------


def _nested(**changes):
    return dataclasses.replace(NSTATE, **changes)


@pytest.mark.parametrize(
    "state,error,message",
    [
        (_nested(absmax=NSTATE.absmax.float()), ValueError, "nested state must hold 60 uint8 codes"),
        (_nested(absmax=NSTATE.absmax[:-1]), ValueError, "nested state must hold 60 uint8 codes"),
        (_nested(offset=None), TypeError, "state.offset must be a torch.Tensor"),
        (_nested(offset=torch.zeros(2)), ValueError, "state.offset must be one float32 value"),
        (_nested(state2="x"), TypeError, "state.state2 must be a QuantState8bit or None"),
        (_nested(state2=F.QuantState8bit(torch.ones(2), F.create_dynamic_map(), 256, torch.float32,
                                          torch.Size([60]))), ValueError, "state.absmax must hold 1 float32"),
        (_nested(state2=F.QuantState8bit(torch.ones(1), F.create_dynamic_map(), 256, torch.float16,
                                          torch.Size([60]))), ValueError, "state.state2.dtype must be torch.float32"),
        (_nested(state2=F.QuantState8bit(torch.ones(1), F.create_dynamic_map(), 100, torch.float32,
                                          torch.Size([60]))), ValueError, "blocksize must be one of 64"),
        (_nested(shape=torch.Size([48, 81])), ValueError, "B has 1920 bytes but state.shape (48, 81) needs 1944"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_nested_state_mismatch(no_native, state, error, message) -> None:
    for call, ref in ((lambda: F.dequantize_4bit(NPACKED, state), "packed"), (lambda: F.gemv_4bit(X, NPACKED, state), "B")):
        with pytest.raises(error) as info:
            call()
        assert message.replace("B has", f"{ref} has") in str(info.value)


def test_compress_statistics_must_be_bool(no_native) -> None:
    with pytest.raises(TypeError, match="compress_statistics must be True or False"):
        F.quantize_4bit(W, compress_statistics=1)


# --- the ops refuse on their own, for direct callers ---------------------------------------------------


U8 = torch.zeros(1920, 1, dtype=torch.uint8)
AB = torch.ones(60)


@pytest.mark.parametrize(
    "name,args,error,message",
    [
        ("quantize_4bit", (W.double(), 64, "nf4"), TypeError, "A must be torch.float32, torch.float16"),
        ("quantize_4bit", (W, 48, "nf4"), ValueError, "blocksize must be a power of two in [32, 4096]"),
        ("quantize_4bit", (W, 8192, "nf4"), ValueError, "blocksize must be a power of two in [32, 4096]"),
        ("quantize_4bit", (W, 64, "int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        ("quantize_4bit", (W.t(), 64, "nf4"), ValueError, "call A.contiguous()"),
        ("quantize_blockwise", (W, F.create_dynamic_map(), 32), ValueError, "power of two in [64, 4096]"),
        ("quantize_blockwise", (W, F.create_dynamic_map()[:-1], 64), ValueError, "code must hold 256 elements"),
        ("dequantize_blockwise", (U8, F.create_dynamic_map(), torch.ones(30), 64, torch.int32), TypeError,
         "dtype must be torch.float32, torch.float16 or torch.bfloat16"),
        ("dequantize_blockwise", (U8, F.create_dynamic_map(), torch.ones(29), 64, torch.float32), ValueError,
         "absmax must hold 30 elements"),
        ("dequantize_4bit", (U8, AB, 64, "nf4", [48, 81], torch.float32), ValueError,
         "packed must hold 1944 elements"),
        ("dequantize_4bit", (U8, AB.double(), 64, "nf4", [48, 80], torch.float32), TypeError,
         "absmax must be torch.float32"),
        ("dequantize_4bit_out", (U8, AB, 64, "nf4", torch.empty(80, 48).t()), ValueError, "call out.contiguous()"),
        ("gemv_4bit", (X, U8, AB, None, 48, 80, 63, "nf4"), ValueError, "blocksize must be a power of two"),
        ("gemv_4bit", (X, U8, AB, torch.ones(48).half(), 48, 80, 64, "nf4"), TypeError, "bias must be torch.float32"),
        ("gemv_4bit", (X[:79], U8, AB, None, 48, 80, 64, "nf4"), ValueError, "A must have shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_ops_reject(no_native, name, args, error, message) -> None:
    # (A meta tensor among the arguments sends a direct op call to the fake implementation, which
    # touches no data; a CPU tensor among CUDA ones fails the implementation's device check.)
    with pytest.raises(error) as info:
        getattr(torch.ops.kbit, name)(*args)
    assert message in str(info.value)


def _adam_args(**changes):
    n = 1000
    args = {"p": torch.zeros(n), "g": torch.zeros(n), "state1": torch.zeros(n, dtype=torch.uint8),
            "state2": torch.zeros(n, dtype=torch.uint8), "absmax1": torch.zeros(4), "absmax2": torch.zeros(4),
            "qmap1": F.create_dynamic_map(True), "qmap2": F.create_dynamic_map(False), "beta1": 0.9,
            "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "lr": 1e-3, "step": 1, "gnorm_scale": 1.0,
            "decoupled": False}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"p": torch.zeros(1000, dtype=torch.float64), "g": torch.zeros(1000, dtype=torch.float64)}, TypeError,
         "p must be torch.float32, torch.float16 or torch.bfloat16"),
        ({"g": torch.zeros(1000).half()}, TypeError, "g must be torch.float32"),
        ({"g": torch.zeros(999)}, ValueError, "g must hold 1000 elements"),
        ({"state1": torch.zeros(1000)}, TypeError, "state1 must be torch.uint8"),
        ({"state2": torch.zeros(999, dtype=torch.uint8)}, ValueError, "state2 must hold 1000 elements"),
        ({"absmax2": torch.zeros(3)}, ValueError, "absmax2 must hold 4 elements"),
        ({"qmap2": torch.zeros(255)}, ValueError, "qmap2 must hold 256 elements"),
        ({"p": torch.zeros(2000)[::2]}, ValueError, "call p.contiguous()"),
        ({"step": 0}, ValueError, "step must be in [1, 2**31)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_adam_op_rejects(no_native, changes, error, message) -> None:
    with pytest.raises(error) as info:
        torch.ops.kbit.adam_8bit_blockwise(**_adam_args(**changes))
    assert message in str(info.value)


# --- modules ---------------------------------------------------------------------------------------------


def test_linear4bit_refuses_devices_and_dtypes() -> None:
    layer = knn.Linear4bit.from_linear(torch.nn.Linear(80, 48))
    with pytest.raises(ValueError, match="A is on meta but B is on cpu"):
        layer(torch.randn(80, device="meta"))
    with pytest.raises(TypeError, match=r"dtype must be torch\.float32"):
        knn.Linear4bit(8, 8, dtype=torch.float64)
    with torch.no_grad():  # non-contiguous inputs are fine: the layer makes them contiguous
        x = torch.randn(160)[::2]
        torch.testing.assert_close(layer(x), layer(x.contiguous()))
        xb = torch.randn(80, 3).t()
        torch.testing.assert_close(layer(xb), layer(xb.contiguous()))


# --- >= 2^31 elements -----------------------------------------------------------------------------------


BIG_N_OUT, BIG_K_IN = 2**16 + 1, 2**15  # 2^31 + 2^15 weight values
NF4_ZERO_PAIR = 0x77  # two NF4 codes of 0.0 (code 7)


def _last_row() -> tuple[torch.Tensor, torch.Tensor, F.QuantState4bit]:
    last = torch.randn(BIG_K_IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, state = F.quantize_4bit(last, blocksize=64)
    return last, packed, state


@pytest.mark.slow
def test_gemv_past_2_pow_31_values() -> None:
    """gemv_4bit over a 65537 x 32768 weight (2^31 + 2^15 values; 1 GiB packed): zeros everywhere but
    the last row, which lies past 2^31 and must come out exactly as that row alone. About 3 s."""
    n = BIG_N_OUT * BIG_K_IN
    assert n > 2**31
    require_memory(n // 2 + n // 16, "a 2^31-value 4-bit weight")
    _, row_packed, row_state = _last_row()
    packed = torch.full((n // 2, 1), NF4_ZERO_PAIR, dtype=torch.uint8)
    packed[-BIG_K_IN // 2:] = row_packed
    absmax = torch.zeros(n // 64)
    absmax[-BIG_K_IN // 64:] = row_state.absmax
    state = F.QuantState4bit(absmax, torch.Size([BIG_N_OUT, BIG_K_IN]), torch.bfloat16, 64, "nf4",
                             F.get_4bit_code("nf4"))
    x = torch.randn(BIG_K_IN, generator=torch.Generator().manual_seed(2))
    y = F.gemv_4bit(x, packed, state)
    assert y.shape == (BIG_N_OUT,) and bool((y[:-1] == 0).all())
    row = F.gemv_4bit(x, row_packed, dataclasses.replace(row_state, shape=torch.Size([1, BIG_K_IN])))
    assert math.isclose(float(y[-1]), float(row[0]), rel_tol=1e-5)
    w32 = F.dequantize_4bit(row_packed, dataclasses.replace(row_state, dtype=torch.float32))  # W' in float32
    assert math.isclose(float(y[-1]), float(x @ w32), rel_tol=1e-4)


@pytest.mark.slow
def test_quantize_4bit_past_2_pow_31_values() -> None:
    """quantize_4bit of 2^31 + 2^15 bf16 values (4 GiB in, 1 GiB out; 10-30 s on 2 cores): the values
    past 2^31 are quantized as if alone, every block before them is zero."""
    n = BIG_N_OUT * BIG_K_IN
    require_memory(2 * n + n // 2 + n // 16, "2^31 bf16 values and their 4-bit codes")
    last, row_packed, row_state = _last_row()
    W = torch.zeros(BIG_N_OUT, BIG_K_IN, dtype=torch.bfloat16)
    W[-1] = last
    packed, state = F.quantize_4bit(W, blocksize=64)
    del W
    assert packed.shape == (BIG_N_OUT * BIG_K_IN // 2, 1)
    assert torch.equal(packed[-BIG_K_IN // 2:], row_packed)
    assert torch.equal(state.absmax[-BIG_K_IN // 64:], row_state.absmax)
    assert bool((packed[: -BIG_K_IN // 2] == NF4_ZERO_PAIR).all()) and bool((state.absmax[: -BIG_K_IN // 64] == 0).all())


def test_element_counts_reach_native_code_as_int64() -> None:
    """Counts past 2^31 are neither truncated on the way down (op schema SymInt, ctypes c_int64) nor
    need memory to be refused: a meta tensor of 2^31 + 2 elements is refused by device, not by size."""
    schema = str(torch.ops.kbit.gemv_4bit.default._schema)
    assert "SymInt n_out" in schema and "SymInt k_in" in schema
    from kbit import _native

    argtypes = {name: sig[1] for name, sig in _native._SIGNATURES.items()}
    assert argtypes["kbit_gemv_4bit"][7] is ctypes.c_int64 and argtypes["kbit_gemv_4bit"][8] is ctypes.c_int64
    for name in ("kbit_quantize_4bit", "kbit_dequantize_4bit"):
        assert argtypes[name][5] is ctypes.c_int64
    assert argtypes["kbit_quantize_blockwise_8bit"][5] is ctypes.c_int64
    assert argtypes["kbit_adam_8bit_blockwise"][17] is ctypes.c_int64
    with pytest.raises(ValueError, match="kbit supports CPU and CUDA tensors only"):
        F.quantize_4bit(torch.empty(2**31 + 2, device="meta"))


# --- NaN / inf -------------------------------------------------------------------------------------------


def test_gemv_nan_and_inf_propagate() -> None:
    x = torch.randn(80, generator=torch.Generator().manual_seed(3))
    x[5] = float("nan")
    assert bool(F.gemv_4bit(x, PACKED, STATE).isnan().all())  # a NaN input touches every output
    Wi = W.clone()
    Wi[7, 3] = float("inf")  # the block of row 7 holding it: absmax inf, its values inf * code = inf/NaN
    packed, state = F.quantize_4bit(Wi, blocksize=64)
    y = F.gemv_4bit(torch.randn(80, generator=torch.Generator().manual_seed(4)), packed, state)
    assert not bool(y[7].isfinite()) and bool(y[:6].isfinite().all()) and bool(y[9:].isfinite().all())
    bias = torch.zeros(48)
    bias[0] = float("inf")
    assert F.gemv_4bit(torch.ones(80), PACKED, STATE, bias)[0] == float("inf")


def test_adam_nan_gradient_poisons_its_block_only() -> None:
    p = torch.nn.Parameter(torch.ones(1024))
    opt = ko.Adam8bit([p], lr=1e-2, min_8bit_size=1)
    g = torch.ones(1024)
    g[300] = float("nan")  # block 1 (values 256..511)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    finite = p.detach().isfinite()
    assert not bool(finite[256:512].any())
    assert bool(finite[:256].all()) and bool(finite[512:].all())
    assert math.isnan(float(opt.state[p]["absmax1"][1])) and bool(opt.state[p]["absmax1"][[0, 2, 3]].isfinite().all())
