"""The CPU's tiled 4-bit layout (kbit.h): kbit_repack_4bit_tiled against the layout's definition, written
out here independently of the C code, and kbit_matmul_4bit_tiled against the matmul's definition
(out = A W'^T (+ bias), W' the float32 reference dequantization; float32 sums in any order; bfloat16
on AVX-512-BF16 with the codebook rounded to bfloat16; one rounding to the dtype). Every kernel path
(KBIT_CPU_SIMD=0 portable, =avx2, =avx512 without VBMI, default), partial groups of 64 columns, every
row-block size, thread counts and batch sizes (neither changes a bit), non-finite values, statuses and
the op's checks."""

from __future__ import annotations

import pytest
import torch
from cpu_paths import expected_path, host_cpu
from kbit import KbitNativeError, _native
from kbit import functional as F
from reference import assert_linear_close, dequantize_4bit_state, linear_tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OK, INVALID, UNSUPPORTED_DTYPE, UNSUPPORTED_BLOCKSIZE, TOO_LARGE, QUANT_TYPE = 0, 1, 2, 3, 4, 6
SIMD = {"default": None, "avx512": "avx512", "avx2": "avx2", "portable": "0"}
CPU = host_cpu()
GROUP = 64

# (m_rows, n_out, k_in, blocksize): one row (two groups at once for float32, an odd last group); a
# single partial group; 2, 3, 4 rows (the 2-, 3- and 4-row kernels); 5 = 4 + 1; 8 and 9 (the 8-row
# kernel, + 1); 15 = 8 + 4 + 3; 16 and 17 (a second 16-row task); 23; blocksize 32 and 4096; k_in = bs.
SHAPES = [
    (1, 7, 64, 64),
    (1, 130, 128, 32),
    (2, 64, 128, 64),
    (3, 65, 192, 64),
    (4, 130, 256, 128),
    (5, 33, 320, 64),
    (8, 70, 128, 64),
    (9, 3, 64, 32),
    (15, 64, 512, 64),
    (16, 100, 256, 256),
    (17, 129, 64, 64),
    (23, 40, 128, 32),
    (2, 5, 4096, 4096),
]


@pytest.fixture(params=list(SIMD))
def cpu_path(request, monkeypatch) -> str:
    """Every kernel path this CPU has (KBIT_CPU_SIMD is read on every call; a level the CPU lacks falls
    back to the next one down, which ran_path then expects)."""
    value = SIMD[request.param]
    if value is None:
        monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("KBIT_CPU_SIMD", value)
    return request.param


def ran_path(cpu_path: str, dtype: torch.dtype) -> None:
    want = expected_path(CPU, "matmul_4bit_tiled", SIMD[cpu_path], bf16=dtype == torch.bfloat16)
    assert _native.cpu_library().last_path() == want


def reference_layout(packed: torch.Tensor, absmax: torch.Tensor, n_out: int, k_in: int,
                     blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kbit.h's tiled layout, from its text: group g holds columns 64 g + c; byte (g, p, c) the codes of
    W[j][2p] (low nibble) and W[j][2p + 1] (high); scale (g, b, 16 (c % 4) + c // 4) row j's absmax of
    block b; columns past n_out code 0 and scale 0. bitsandbytes' packing: value 2t in the high nibble."""
    groups, blocks = -(-n_out // GROUP), k_in // blocksize
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: n_out * k_in].reshape(n_out, k_in)
    padded = torch.zeros(groups * GROUP, k_in, dtype=torch.uint8)
    padded[:n_out] = codes
    byte = padded[:, 0::2] | (padded[:, 1::2] << 4)  # (columns, pairs)
    tiled = byte.reshape(groups, GROUP, k_in // 2).transpose(1, 2).contiguous().reshape(-1)
    amax = torch.zeros(groups * GROUP, blocks)
    amax[:n_out] = absmax.reshape(n_out, blocks)
    lanes = amax.reshape(groups, GROUP, blocks).transpose(1, 2)  # (g, b, c)
    c = torch.arange(GROUP)
    scales = torch.empty_like(lanes)
    scales[:, :, 16 * (c % 4) + c // 4] = lanes
    return tiled, scales.reshape(-1)


def weight(n_out: int, k_in: int, blocksize: int, quant_type: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = F.quantize_4bit(torch.randn(n_out, k_in, generator=gen), blocksize=blocksize,
                                    quant_type=quant_type, compress_statistics=False)
    tiled, scales = torch.ops.kbit.repack_4bit_tiled(packed, state.absmax, n_out, k_in, blocksize)
    return packed, state, tiled, scales, dequantize_4bit_state(packed, state).float()


def matmul(A, tiled, scales, n_out, k_in, bs, quant_type="nf4", bias=None):
    return torch.ops.kbit.matmul_4bit_tiled(A, tiled, scales, bias, n_out, k_in, bs, quant_type)


@pytest.mark.parametrize("shape", [(1, 64, 32), (7, 64, 64), (64, 128, 64), (65, 256, 128), (200, 64, 32),
                                   (3, 4096, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_repack_is_the_layout(shape) -> None:
    n_out, k_in, bs = shape
    packed, state = F.quantize_4bit(torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(n_out)),
                                    blocksize=bs, quant_type="fp4", compress_statistics=False)
    tiled, scales = torch.ops.kbit.repack_4bit_tiled(packed, state.absmax, n_out, k_in, bs)
    want_tiled, want_scales = reference_layout(packed, state.absmax, n_out, k_in, bs)
    assert torch.equal(tiled, want_tiled)
    assert torch.equal(scales, want_scales)


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiled_matmul_matches_the_definition(cpu_path, shape, dtype, quant_type, use_bias) -> None:
    m, n_out, k_in, bs = shape
    _, _, tiled, scales, W = weight(n_out, k_in, bs, quant_type, seed=m * n_out + k_in)
    gen = torch.Generator().manual_seed(k_in)
    A = torch.randn(m, k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype) if use_bias else None
    out = matmul(A, tiled, scales, n_out, k_in, bs, quant_type, bias)
    ran_path(cpu_path, dtype)
    assert out.shape == (m, n_out) and out.dtype == dtype
    assert_linear_close(out, A, W, bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_tiled_matmul_is_tight_for_a_real_layer(cpu_path, dtype, m) -> None:
    """A 1024 x 1024 NF4 layer: far inside the worst-case bound, so a kernel that lost precision (summed
    in bfloat16, dropped or repeated a block's scale, rounded the absmax) fails."""
    _, _, tiled, scales, W = weight(1024, 1024, 64, "nf4", seed=m)
    A = torch.randn(m, 1024, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = matmul(A, tiled, scales, 1024, 1024, 64).double()
    ran_path(cpu_path, dtype)
    ref, _ = linear_tolerance(A, W, None, torch.float32)
    scale = float((A.double().abs() @ W.double().abs().T).max())
    bf16_code = 2.0**-9 if dtype == torch.bfloat16 else 0.0  # the codebook in bfloat16: a random-sign error
    out_eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert float((out - ref).abs().max()) <= scale * (2e-6 + bf16_code / 8) + float(ref.abs().max()) * out_eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threads_and_batch_size_do_not_change_a_bit(cpu_path, monkeypatch, dtype) -> None:
    """Each output is one task's, summed in one order: 1 or 5 threads, and row i alone or in a batch of
    23 (every row-block kernel), give the same bytes."""
    n_out, k_in = 200, 1024
    _, _, tiled, scales, _ = weight(n_out, k_in, 64, "nf4")
    A = torch.randn(23, k_in, generator=torch.Generator().manual_seed(2)).to(dtype)
    monkeypatch.setenv("KBIT_NUM_THREADS", "1")
    one = matmul(A, tiled, scales, n_out, k_in, 64)
    monkeypatch.setenv("KBIT_NUM_THREADS", "5")
    five = matmul(A, tiled, scales, n_out, k_in, 64)
    assert torch.equal(one, five)
    for lo, hi in ((0, 1), (5, 6), (1, 3), (3, 6), (6, 10), (0, 8), (7, 23)):
        assert torch.equal(matmul(A[lo:hi], tiled, scales, n_out, k_in, 64), one[lo:hi]), (lo, hi)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_non_finite_values_reach_only_their_outputs(cpu_path, m) -> None:
    packed, state, tiled, scales, _ = weight(70, 256, 64, "nf4")
    A = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    A[m - 1, 17] = float("nan")
    out = matmul(A, tiled, scales, 70, 256, 64)
    assert torch.isnan(out[m - 1]).all() and torch.isfinite(out[: m - 1]).all()
    absmax = state.absmax.clone()
    absmax[4 * 65 + 2] = float("inf")  # row 65 (group 1, column 1) of W, its block 2
    tiled, scales = torch.ops.kbit.repack_4bit_tiled(packed, absmax, 70, 256, 64)
    A = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    out = matmul(A, tiled, scales, 70, 256, 64)
    others = [j for j in range(70) if j != 65]
    assert (~torch.isfinite(out[:, 65])).all() and torch.isfinite(out[:, others]).all()


def test_rows_of_any_leading_shape_and_empty_inputs() -> None:
    _, _, tiled, scales, W = weight(10, 64, 64, "fp4")
    A = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    out = matmul(A, tiled, scales, 10, 64, 64, "fp4")
    assert out.shape == (2, 3, 10)
    assert_linear_close(out, A, W)
    assert matmul(torch.empty(0, 64), tiled, scales, 10, 64, 64).shape == (0, 10)
    bias = torch.tensor([1.5, -2.0, 3.25])
    empty = torch.empty(0, dtype=torch.uint8)
    got = torch.ops.kbit.matmul_4bit_tiled(torch.empty(2, 0), empty, torch.empty(0), bias, 3, 0, 64, "nf4")
    assert torch.equal(got, bias.expand(2, 3))
    assert torch.equal(torch.ops.kbit.matmul_4bit_tiled(torch.empty(2, 0), empty, torch.empty(0), None, 3, 0, 64,
                                                        "nf4"), torch.zeros(2, 3))


@pytest.fixture(scope="module")
def lib() -> _native.NativeLibrary:
    return _native.cpu_library()


def test_bad_arguments_return_their_status(lib) -> None:
    h = lib.handle
    packed, absmax = torch.zeros(3 * 32, dtype=torch.uint8), torch.ones(3)
    tiled, scales = torch.zeros(32 * 64, dtype=torch.uint8), torch.zeros(64)
    A, out = torch.zeros(2, 64), torch.zeros(6)
    r = (packed.data_ptr(), absmax.data_ptr(), tiled.data_ptr(), scales.data_ptr())
    assert h.kbit_repack_4bit_tiled(*r, 3, 64, 64) == OK
    assert h.kbit_repack_4bit_tiled(*r, 3, 96, 64) == INVALID  # k_in % blocksize
    assert h.kbit_repack_4bit_tiled(*r, -3, 64, 64) == INVALID
    assert h.kbit_repack_4bit_tiled(*r, 3, -64, 64) == INVALID
    assert h.kbit_repack_4bit_tiled(*r, 3, 64, 48) == UNSUPPORTED_BLOCKSIZE
    assert h.kbit_repack_4bit_tiled(*r, 3, 64, 16) == UNSUPPORTED_BLOCKSIZE
    assert h.kbit_repack_4bit_tiled(None, *r[1:], 3, 64, 64) == INVALID
    assert h.kbit_repack_4bit_tiled(*r[:3], None, 3, 64, 64) == INVALID
    assert h.kbit_repack_4bit_tiled(*r, 2**60, 2**10, 64) == TOO_LARGE
    p = (A.data_ptr(), tiled.data_ptr(), scales.data_ptr(), None, out.data_ptr())
    assert h.kbit_matmul_4bit_tiled(0, 1, *p, 2, 3, 64, 64, None) == OK
    assert h.kbit_matmul_4bit_tiled(0, 1, *p, 2, 3, 96, 64, None) == INVALID
    assert h.kbit_matmul_4bit_tiled(0, 1, *p, -1, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit_tiled(0, 1, *p[:4], None, 2, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit_tiled(0, 1, None, *p[1:], 2, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit_tiled(3, 1, *p, 2, 3, 64, 64, None) == UNSUPPORTED_DTYPE
    assert h.kbit_matmul_4bit_tiled(0, 1, *p, 2, 3, 64, 48, None) == UNSUPPORTED_BLOCKSIZE
    assert h.kbit_matmul_4bit_tiled(0, 2, *p, 2, 3, 64, 64, None) == QUANT_TYPE
    assert h.kbit_matmul_4bit_tiled(0, 1, *p, 2**40, 2**22, 64, 64, None) == TOO_LARGE
    with pytest.raises(KbitNativeError, match=r"kbit_matmul_4bit_tiled.*invalid argument"):
        lib.matmul_4bit_tiled(0, 1, *p, 2, 3, 96, 64, None)


def test_the_ops_check_before_native_code() -> None:
    packed, state, tiled, scales, _ = weight(10, 64, 32, "nf4")
    with pytest.raises(ValueError, match="the tiled layout needs k_in to be a multiple of blocksize, got k_in 64 "
                                         "and blocksize 128"):
        torch.ops.kbit.repack_4bit_tiled(packed, state.absmax, 10, 64, 128)
    with pytest.raises(ValueError, match="packed must hold 320 elements"):
        torch.ops.kbit.repack_4bit_tiled(packed[:-1], state.absmax, 10, 64, 32)
    with pytest.raises(TypeError, match=r"absmax must be torch\.float32"):
        torch.ops.kbit.repack_4bit_tiled(packed, state.absmax.double(), 10, 64, 32)
    with pytest.raises(ValueError, match="the tiled 4-bit layout is the CPU's: packed is on meta"):
        torch.ops.kbit.repack_4bit_tiled(packed.to("meta"), state.absmax.to("meta"), 10, 64, 32)
    A = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., 64\)"):
        matmul(torch.zeros(3, 63), tiled, scales, 10, 64, 32)
    with pytest.raises(TypeError, match="A must be"):
        matmul(A.double(), tiled, scales, 10, 64, 32)
    with pytest.raises(ValueError, match="tiled must hold 2048 elements"):
        matmul(A, tiled[:-1], scales, 10, 64, 32)
    with pytest.raises(ValueError, match="scales must hold 128 elements"):
        matmul(A, tiled, scales[:-1], 10, 64, 32)
    with pytest.raises(ValueError, match="bias must hold 10 elements"):
        matmul(A, tiled, scales, 10, 64, 32, bias=torch.zeros(9))
    with pytest.raises(ValueError, match="the tiled 4-bit layout is the CPU's: A is on meta"):
        matmul(A.to("meta"), tiled.to("meta"), scales.to("meta"), 10, 64, 32)
    with pytest.raises(ValueError, match="the tiled layout needs k_in"):
        matmul(torch.zeros(3, 96), tiled, scales, 10, 96, 64)


def test_the_layers_own_path_gives_the_same_bytes_and_checks_the_callers_tensors() -> None:
    """Linear4bit's call (kbit._ops.matmul_4bit_tiled_own: no dispatcher, its own copy trusted) gives the
    op's bytes, and a bad A or bias still fails with the op's error before native code."""
    from kbit import _ops

    _, _, tiled, scales, _ = weight(10, 64, 32, "nf4")
    A, bias = torch.randn(3, 64), torch.randn(10)
    args = (tiled, scales, bias, 10, 64, 32, "nf4")
    assert torch.equal(_ops.matmul_4bit_tiled_own(A, *args), matmul(A, tiled, scales, 10, 64, 32, "nf4", bias))
    with pytest.raises(TypeError, match="A must be"):
        _ops.matmul_4bit_tiled_own(A.double(), *args)
    with pytest.raises(ValueError, match="A is not contiguous"):
        _ops.matmul_4bit_tiled_own(torch.randn(64, 3).t(), *args)
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., 64\)"):
        _ops.matmul_4bit_tiled_own(torch.randn(3, 65), *args)
    with pytest.raises(ValueError, match="the tiled 4-bit layout is the CPU's: A is on meta"):
        _ops.matmul_4bit_tiled_own(A.to("meta"), *args)
    with pytest.raises(ValueError, match="bias must hold 10 elements"):
        _ops.matmul_4bit_tiled_own(A, tiled, scales, torch.randn(9), 10, 64, 32, "nf4")
    with pytest.raises(TypeError, match=r"bias must be torch\.float32"):
        _ops.matmul_4bit_tiled_own(A, tiled, scales, bias.half(), 10, 64, 32, "nf4")
