"""kbit_gemv_4bit of the CPU library, called directly (no Python surface), against plain torch:
out = dequantize_4bit(W) @ A (+ bias) with W' in float32, for every dtype, both quant types, blocksizes
32..4096, blocks straddling rows, odd k_in, with and without bias; the argument checks' statuses; and,
with a GPU, the CUDA library against the CPU one."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch
from cpu_paths import expected_path, host_cpu
from kbit import KbitNativeError, _native
from kbit import functional as F
from machine import require_memory

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KBIT_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KBIT_QUANT = {"fp4": 0, "nf4": 1}
QUANT_TYPES = ["nf4", "fp4"]
# kbit.h statuses
OK, INVALID, UNSUPPORTED_DTYPE, UNSUPPORTED_BLOCKSIZE, TOO_LARGE, UNSUPPORTED_QUANT_TYPE = 0, 1, 2, 3, 4, 6
# float32 rounding of the output dtype (relative)
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# (n_out, k_in, blocksize): rows = whole blocks; blocks straddling rows; odd k_in (rows start at low
# nibbles); k_in smaller than a block; k_in = 1; a block per many rows; the largest blocksize.
SHAPES = [
    (5, 64, 64),
    (8, 256, 32),
    (7, 100, 64),
    (3, 33, 32),
    (11, 77, 128),
    (6, 5, 32),
    (9, 1, 32),
    (13, 300, 1024),
    (3, 4097, 4096),
    (2, 8192, 4096),
    (4, 1000, 2048),
    (10, 513, 512),
]


@pytest.fixture(scope="module")
def lib() -> _native.NativeLibrary:
    return _native.cpu_library()


@pytest.fixture(params=["default", "baseline"])
def cpu_path(request, monkeypatch) -> str:
    """Both CPU code paths: the default (AVX2 + FMA where the CPU has them) and the baseline x86-64 one
    (KBIT_CPU_SIMD=0, read on every call)."""
    if request.param == "baseline":
        monkeypatch.setenv("KBIT_CPU_SIMD", "0")
    else:
        monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    return request.param


def quantized_weight(n_out: int, k_in: int, blocksize: int, quant_type: str, dtype: torch.dtype, seed: int = 0):
    """W (n_out x k_in) quantized as one flat tensor, and its float32 dequantization W'."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, k_in, generator=gen).to(dtype)
    packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
    W32 = F.dequantize_4bit(packed, dataclasses.replace(state, dtype=torch.float32))
    assert W32.dtype == torch.float32 and W32.shape == (n_out, k_in)
    return packed, state.absmax, W32


def gemv(lib, A, packed, absmax, bias, n_out, k_in, blocksize, quant_type, out=None):
    out = torch.empty(n_out, dtype=A.dtype) if out is None else out
    lib.gemv_4bit(KBIT_DTYPE[A.dtype], KBIT_QUANT[quant_type], A.data_ptr(), packed.data_ptr(), absmax.data_ptr(),
                  None if bias is None else bias.data_ptr(), out.data_ptr(), n_out, k_in, blocksize, None)
    return out


def check_close(out: torch.Tensor, A: torch.Tensor, W32: torch.Tensor, bias) -> None:
    """out == W' @ A (+ bias) up to float32 accumulation (bounded by k * eps32 * sum |A W'|) and the final
    rounding to out's dtype."""
    A64, W64 = A.double(), W32.double()
    ref = W64 @ A64
    if bias is not None:
        ref = ref + bias.double()
    mag = W64.abs() @ A64.abs() + (0 if bias is None else bias.double().abs())
    k = max(W32.shape[1], 1)
    tol = mag * (k * 2.0**-24 + 1e-7) + ref.abs() * OUT_EPS[out.dtype] + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemv_equals_dequantize_then_matmul(lib, cpu_path, shape, dtype, quant_type, use_bias) -> None:
    n_out, k_in, blocksize = shape
    packed, absmax, W32 = quantized_weight(n_out, k_in, blocksize, quant_type, dtype, seed=n_out * k_in)
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype) if use_bias else None
    out = gemv(lib, A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    assert lib.last_path() == expected_path(host_cpu(), "gemv_4bit", "0" if cpu_path == "baseline" else None)
    check_close(out, A.float(), W32, None if bias is None else bias.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_is_tight_against_float64(lib, cpu_path, dtype) -> None:
    """A 4096 x 4096 NF4 weight: the float32 accumulation is close to the exact float64 product (a
    much tighter bound than check_close's worst case), and equal to torch's float32 matmul within
    rounding."""
    n, blocksize = 4096, 64
    packed, absmax, W32 = quantized_weight(n, n, blocksize, "nf4", torch.float32, seed=3)
    A = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = gemv(lib, A, packed, absmax, None, n, n, blocksize, "nf4").double()
    ref = W32.double() @ A.double()
    scale = (W32.double().abs() @ A.double().abs()).max()
    assert (out - ref).abs().max() <= scale * (2e-6 + 4 * OUT_EPS[dtype])
    torch.testing.assert_close(out.float(), (W32 @ A.float()).to(dtype).float(), rtol=2 * OUT_EPS[dtype] + 1e-5,
                               atol=scale.item() * 2e-6)


def test_threads_do_not_change_the_result(lib, cpu_path, monkeypatch) -> None:
    n_out, k_in, blocksize = 333, 1031, 64
    packed, absmax, _ = quantized_weight(n_out, k_in, blocksize, "nf4", torch.float32)
    A = torch.randn(k_in, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("KBIT_NUM_THREADS", "1")
    one = gemv(lib, A, packed, absmax, None, n_out, k_in, blocksize, "nf4")
    monkeypatch.setenv("KBIT_NUM_THREADS", "7")
    seven = gemv(lib, A, packed, absmax, None, n_out, k_in, blocksize, "nf4")
    assert torch.equal(one, seven)


def test_k_in_zero_writes_bias_or_zero(lib) -> None:
    bias = torch.tensor([1.5, -2.0, 3.25])
    out = torch.full((3,), float("nan"))
    empty = torch.empty(0, dtype=torch.uint8)
    h = lib.handle
    assert h.kbit_gemv_4bit(0, 1, None, None, None, bias.data_ptr(), out.data_ptr(), 3, 0, 64, None) == OK
    assert torch.equal(out, bias)
    assert h.kbit_gemv_4bit(0, 1, None, empty.data_ptr(), None, None, out.data_ptr(), 3, 0, 64, None) == OK
    assert torch.equal(out, torch.zeros(3))


def test_n_out_zero_is_a_no_op(lib) -> None:
    assert lib.handle.kbit_gemv_4bit(0, 1, None, None, None, None, None, 0, 4096, 64, None) == OK


def test_nan_in_a_block_reaches_only_its_rows(lib) -> None:
    n_out, k_in, blocksize = 4, 48, 32  # block 1 straddles rows 0 and 1
    W = torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(9))
    W[0, 40] = float("nan")
    packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    out = gemv(lib, torch.ones(k_in), packed, state.absmax, None, n_out, k_in, blocksize, "nf4")
    assert out[:2].isnan().all() and out[2:].isfinite().all()


def test_large_row_offsets(lib) -> None:
    """More than 2^31 weight values (1 GiB packed): the last rows' offsets need 64-bit indexing."""
    n_out, k_in, blocksize = (1 << 20) + 3, 2048, 4096
    n = n_out * k_in
    assert n > 2**31
    require_memory((n + 1) // 2 + 4 * n // blocksize, "a 1 GiB 4-bit weight")
    packed = torch.zeros((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.zeros((n + blocksize - 1) // blocksize)
    tail = slice(n_out - 3, n_out)
    W_tail = torch.randn(3, k_in, generator=torch.Generator().manual_seed(5))
    p_tail, s_tail = F.quantize_4bit(W_tail, blocksize=blocksize, quant_type="nf4")
    packed[-p_tail.numel():] = p_tail.reshape(-1)
    absmax[-s_tail.absmax.numel():] = s_tail.absmax
    A = torch.randn(k_in, generator=torch.Generator().manual_seed(6))
    out = gemv(lib, A, packed, absmax, None, n_out, k_in, blocksize, "nf4")
    W32 = F.dequantize_4bit(p_tail, s_tail)
    torch.testing.assert_close(out[tail], W32 @ A, rtol=1e-5, atol=1e-4)
    del packed


# --- bad arguments: the status of the raw call ---------------------------------------------------------


def test_bad_arguments_return_their_status(lib) -> None:
    A = torch.randn(64)
    packed = torch.zeros(64 * 4 // 2, dtype=torch.uint8)
    absmax = torch.ones(4)
    out = torch.empty(4)
    h = lib.handle

    good = dict(dtype=0, qt=1, a=A.data_ptr(), p=packed.data_ptr(), m=absmax.data_ptr(), bias=None,
                o=out.data_ptr(), n_out=4, k_in=64, blocksize=64)

    def call(**kw):
        a = {**good, **kw}
        return h.kbit_gemv_4bit(a["dtype"], a["qt"], a["a"], a["p"], a["m"], a["bias"], a["o"], a["n_out"],
                                a["k_in"], a["blocksize"], None)

    assert call() == OK
    assert call(n_out=-1) == INVALID
    assert call(k_in=-1) == INVALID
    assert call(dtype=3) == UNSUPPORTED_DTYPE
    assert call(dtype=-1) == UNSUPPORTED_DTYPE
    assert call(qt=2) == UNSUPPORTED_QUANT_TYPE
    for bs in (16, 48, 8192, 0, -64):
        assert call(blocksize=bs) == UNSUPPORTED_BLOCKSIZE
    assert call(a=None) == INVALID
    assert call(p=None) == INVALID
    assert call(m=None) == INVALID
    assert call(o=None) == INVALID
    assert call(n_out=1 << 62) == TOO_LARGE
    assert call(n_out=1 << 40, k_in=1 << 40) == TOO_LARGE
    assert call(n_out=(1 << 63) - 1, k_in=(1 << 63) - 1) == TOO_LARGE


def test_method_raises_on_a_bad_status(lib) -> None:
    A = torch.randn(64)
    with pytest.raises(KbitNativeError, match="blocksize"):
        lib.gemv_4bit(0, 1, A.data_ptr(), A.data_ptr(), A.data_ptr(), None, A.data_ptr(), 1, 64, 100, None)


def test_signature_is_bound(lib) -> None:
    fn = lib.handle.kbit_gemv_4bit
    assert fn.restype is ctypes.c_int and len(fn.argtypes) == 11


# --- CUDA ----------------------------------------------------------------------------------------------


def cuda_lib():
    load = _native.cuda_library()
    if load.library is None:
        pytest.skip("no CUDA library loaded")
    return load.library


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (4096, 4096, 64), (1000, 4095, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_cpu(lib, shape, dtype, quant_type, use_bias) -> None:
    glib = cuda_lib()
    n_out, k_in, blocksize = shape
    packed, absmax, W32 = quantized_weight(n_out, k_in, blocksize, quant_type, dtype, seed=n_out + k_in)
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype) if use_bias else None
    cpu = gemv(lib, A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    gA, gp, gm = A.cuda(), packed.cuda(), absmax.cuda()
    gbias = None if bias is None else bias.cuda()
    gout = torch.empty(n_out, dtype=dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    glib.gemv_4bit(KBIT_DTYPE[dtype], KBIT_QUANT[quant_type], gA.data_ptr(), gp.data_ptr(), gm.data_ptr(),
                   None if gbias is None else gbias.data_ptr(), gout.data_ptr(), n_out, k_in, blocksize, stream)
    torch.cuda.synchronize()
    check_close(gout.cpu(), A.float(), W32, None if bias is None else bias.float())
    mag = (W32.abs() @ A.float().abs()).max().item()
    torch.testing.assert_close(gout.cpu().float(), cpu.float(), rtol=2 * OUT_EPS[dtype] + 1e-5,
                               atol=mag * 1e-5 + 1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_unaligned_packed_takes_the_byte_path() -> None:
    """packed at an odd address (a view one byte in): the word path must not be used."""
    glib = cuda_lib()
    n_out, k_in, blocksize = 64, 256, 64
    packed, absmax, W32 = quantized_weight(n_out, k_in, blocksize, "nf4", torch.float32)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:] = packed.reshape(-1).cuda()
    A = torch.randn(k_in, device="cuda")
    out = torch.empty(n_out, device="cuda")
    glib.gemv_4bit(0, 1, A.data_ptr(), buf[1:].data_ptr(), absmax.cuda().data_ptr(), None, out.data_ptr(), n_out,
                   k_in, blocksize, torch.cuda.current_stream().cuda_stream)
    torch.testing.assert_close(out.cpu(), W32 @ A.cpu(), rtol=1e-5, atol=1e-4)
