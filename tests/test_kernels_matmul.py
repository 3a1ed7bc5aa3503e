"""kbit_matmul_4bit of the CPU library against the definition (kbit.h): out = A W'^T (+ bias) with W'
the float32 reference dequantization, float32 sums in any order, for bfloat16 W' possibly rounded to
bfloat16 first, then one rounding to the dtype. Every kernel path (KBIT_CPU_SIMD=0: portable loops,
=avx2, default: AVX-512 and AVX-512-BF16 where the CPU has them), both layouts (k_in a multiple of the
blocksize, or blocks straddling rows), the direct (up to 4 rows) and tiled kernels, chunk boundaries,
thread counts, non-finite values, the argument checks' statuses, and the CUDA library with a GPU."""

from __future__ import annotations

import pytest
import torch
from cpu_paths import expected_path, host_cpu
from kbit import KbitNativeError, _native
from kbit import functional as F
from reference import assert_linear_close, dequantize_4bit_state, linear_tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KBIT_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KBIT_QUANT = {"fp4": 0, "nf4": 1}
OK, INVALID, UNSUPPORTED_DTYPE, UNSUPPORTED_BLOCKSIZE, TOO_LARGE = 0, 1, 2, 3, 4
SIMD = {"default": None, "avx2": "avx2", "portable": "0"}
CPU = host_cpu()

# (m_rows, n_out, k_in, blocksize): one row; the direct kernel's 2-4 rows with n_out odd (a single last
# column); k_in = 32 mod 64 (bfloat16's 64-value groups); blocks straddling rows; odd k_in (rows start at
# low nibbles); 5 and 17 rows (the tiled kernel, a partial 4-row block); more than one k chunk (2048
# values) with 70 rows; the largest blocksize; k_in = 1 and 5.
SHAPES = [
    (1, 7, 64, 64),
    (2, 5, 128, 64),
    (3, 6, 192, 32),
    (3, 9, 96, 32),
    (4, 13, 256, 128),
    (3, 7, 100, 64),
    (4, 6, 33, 32),
    (5, 9, 320, 64),
    (17, 33, 256, 128),
    (70, 10, 2112, 64),
    (2, 3, 8192, 4096),
    (6, 4, 1, 32),
    (9, 6, 5, 32),
]


@pytest.fixture(params=["default", "avx2", "portable"])
def cpu_path(request, monkeypatch) -> str:
    """Every CPU kernel path this CPU has (KBIT_CPU_SIMD is read on every call; where the CPU lacks a
    level, the cap falls back to the next one down, which is then tested twice; ran_path checks which)."""
    value = SIMD[request.param]
    if value is None:
        monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("KBIT_CPU_SIMD", value)
    return request.param


def ran_path(cpu_path: str, A: torch.Tensor, k_in: int, blocksize: int) -> None:
    """The last matmul ran the kernel this CPU's flags and KBIT_CPU_SIMD call for (tests/cpu_paths.py)."""
    want = expected_path(CPU, "matmul_4bit", SIMD[cpu_path], bf16=A.dtype == torch.bfloat16,
                         m_rows=A.numel() // max(k_in, 1), k_in=k_in, blocksize=blocksize)
    assert _native.cpu_library().last_path() == want


def weight(n_out: int, k_in: int, blocksize: int, quant_type: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed, state = F.quantize_4bit(torch.randn(n_out, k_in, generator=gen), blocksize=blocksize,
                                    quant_type=quant_type, compress_statistics=False)
    return packed, state, dequantize_4bit_state(packed, state).float()


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_matches_the_definition(cpu_path, shape, dtype, quant_type, use_bias) -> None:
    m, n_out, k_in, bs = shape
    packed, state, W = weight(n_out, k_in, bs, quant_type, seed=m * n_out + k_in)
    gen = torch.Generator().manual_seed(k_in)
    A = torch.randn(m, k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype) if use_bias else None
    out = F.matmul_4bit(A, packed, state, bias)
    ran_path(cpu_path, A, k_in, bs)
    assert out.shape == (m, n_out) and out.dtype == dtype
    assert_linear_close(out, A, W, bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_matmul_is_tight_for_a_real_layer(cpu_path, dtype, m) -> None:
    """A 1024 x 1024 NF4 layer: far inside the worst-case bound (float32 sums of 1024 terms are off by
    ~sqrt(k) * 2^-24 of the magnitude, not k * 2^-24), so a kernel that lost precision (e.g. summed
    in bfloat16, or dropped a block's scale) fails."""
    packed, state, W = weight(1024, 1024, 64, "nf4", seed=m)
    A = torch.randn(m, 1024, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = F.matmul_4bit(A, packed, state).double()
    ran_path(cpu_path, A, 1024, 64)
    ref, _ = linear_tolerance(A, W, None, torch.float32)
    scale = float((A.double().abs() @ W.double().abs().T).max())
    bf16_w = 2.0**-9 if dtype == torch.bfloat16 else 0.0  # W' rounded to bfloat16: a random-sign error
    out_eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert float((out - ref).abs().max()) <= scale * (2e-6 + bf16_w / 8) + float(ref.abs().max()) * out_eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_the_result(cpu_path, monkeypatch, dtype) -> None:
    for m, n_out, k_in in ((3, 333, 1024), (23, 101, 2112)):
        packed, state, _ = weight(n_out, k_in, 64, "nf4")
        A = torch.randn(m, k_in, generator=torch.Generator().manual_seed(2)).to(dtype)
        monkeypatch.setenv("KBIT_NUM_THREADS", "1")
        one = F.matmul_4bit(A, packed, state)
        monkeypatch.setenv("KBIT_NUM_THREADS", "5")
        five = F.matmul_4bit(A, packed, state)
        assert torch.equal(one, five)


def test_paths_agree_with_each_other_within_the_bound(monkeypatch) -> None:
    """The three paths on one input: each within the definition's bound (above), and the portable one
    reproducible call after call."""
    packed, state, W = weight(64, 640, 64, "nf4")
    A = torch.randn(6, 640, generator=torch.Generator().manual_seed(9))
    outs = {}
    for value in ("0", "avx2", "1"):
        monkeypatch.setenv("KBIT_CPU_SIMD", value)
        outs[value] = F.matmul_4bit(A, packed, state)
        assert_linear_close(outs[value], A, W)
    monkeypatch.setenv("KBIT_CPU_SIMD", "0")
    assert torch.equal(F.matmul_4bit(A, packed, state), outs["0"])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_non_finite_values_reach_only_their_outputs(cpu_path, m) -> None:
    packed, state, _ = weight(12, 256, 64, "nf4")
    A = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    A[m - 1, 17] = float("nan")
    out = F.matmul_4bit(A, packed, state)
    assert torch.isnan(out[m - 1]).all() and torch.isfinite(out[: m - 1]).all()
    absmax = state.absmax.clone()
    absmax[4] = float("inf")  # block 4: values 256..319, row 1 of W (k_in = 256)
    A = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    out = F.matmul_4bit(A, packed, state.__class__(**{**state.__dict__, "absmax": absmax}))
    assert (~torch.isfinite(out[:, 1])).all() and torch.isfinite(out[:, [0, *range(2, 12)]]).all()


def test_rows_of_any_leading_shape() -> None:
    packed, state, W = weight(10, 64, 64, "fp4")
    A = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    out = F.matmul_4bit(A, packed, state)
    assert out.shape == (2, 3, 10)
    assert_linear_close(out, A, W)
    assert F.matmul_4bit(torch.empty(0, 64), packed, state).shape == (0, 10)


def test_gradients_flow_to_a_and_bias() -> None:
    packed, state, W = weight(10, 64, 64, "nf4")
    A = torch.randn(3, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    F.matmul_4bit(A, packed, state, bias).sum().backward()
    torch.testing.assert_close(A.grad, W.sum(0, keepdim=True).expand(3, 64))
    assert torch.equal(bias.grad, torch.full((10,), 3.0))


@pytest.fixture(scope="module")
def lib() -> _native.NativeLibrary:
    return _native.cpu_library()


def test_k_in_zero_writes_bias_and_m_zero_nothing(lib) -> None:
    h = lib.handle
    bias = torch.tensor([1.5, -2.0, 3.25])
    out = torch.full((2, 3), float("nan"))
    assert h.kbit_matmul_4bit(0, 1, None, None, None, bias.data_ptr(), out.data_ptr(), 2, 3, 0, 64, None) == OK
    assert torch.equal(out, bias.expand(2, 3))
    assert h.kbit_matmul_4bit(0, 1, None, None, None, None, out.data_ptr(), 2, 3, 0, 64, None) == OK
    assert torch.equal(out, torch.zeros(2, 3))
    untouched = torch.full((3,), 7.0)
    assert h.kbit_matmul_4bit(0, 1, None, None, None, None, untouched.data_ptr(), 0, 3, 64, 64, None) == OK
    assert h.kbit_matmul_4bit(0, 1, None, None, None, None, None, 2, 0, 64, 64, None) == OK
    assert torch.equal(untouched, torch.full((3,), 7.0))


def test_bad_arguments_return_their_status(lib) -> None:
    h = lib.handle
    A, packed, absmax, out = torch.zeros(2, 64), torch.zeros(32 * 3, dtype=torch.uint8), torch.ones(3), torch.zeros(6)
    p = (A.data_ptr(), packed.data_ptr(), absmax.data_ptr(), None, out.data_ptr())
    assert h.kbit_matmul_4bit(0, 1, *p, 2, 3, 64, 64, None) == OK
    assert h.kbit_matmul_4bit(0, 1, *p, -1, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit(0, 1, *p, 2, -3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit(0, 1, *p, 2, 3, -64, 64, None) == INVALID
    assert h.kbit_matmul_4bit(0, 1, *p[:4], None, 2, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit(0, 1, None, *p[1:], 2, 3, 64, 64, None) == INVALID
    assert h.kbit_matmul_4bit(3, 1, *p, 2, 3, 64, 64, None) == UNSUPPORTED_DTYPE
    assert h.kbit_matmul_4bit(0, 1, *p, 2, 3, 64, 48, None) == UNSUPPORTED_BLOCKSIZE
    assert h.kbit_matmul_4bit(0, 2, *p, 2, 3, 64, 64, None) == 6
    assert h.kbit_matmul_4bit(0, 1, *p, 2**40, 2**22, 64, 64, None) == TOO_LARGE
    with pytest.raises(KbitNativeError, match=r"kbit_matmul_4bit.*unsupported blocksize"):
        lib.matmul_4bit(0, 1, *p, 2, 3, 64, 48, None)


def test_the_op_checks_before_native_code() -> None:
    packed, state, _ = weight(10, 64, 64, "nf4")
    absmax = state.absmax
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., 64\)"):
        torch.ops.kbit.matmul_4bit(torch.zeros(3, 63), packed, absmax, None, 10, 64, 64, "nf4")
    with pytest.raises(TypeError, match="A must be"):
        torch.ops.kbit.matmul_4bit(torch.zeros(3, 64, dtype=torch.float64), packed, absmax, None, 10, 64, 64, "nf4")
    with pytest.raises(ValueError, match="packed must hold 320 elements"):
        torch.ops.kbit.matmul_4bit(torch.zeros(3, 64), packed[:-1], absmax, None, 10, 64, 64, "nf4")
    with pytest.raises(ValueError, match="bias must hold 10 elements"):
        torch.ops.kbit.matmul_4bit(torch.zeros(3, 64), packed, absmax, torch.zeros(9), 10, 64, 64, "nf4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:8], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_the_definition(shape, dtype) -> None:
    m, n_out, k_in, bs = shape
    packed, state, W = weight(n_out, k_in, bs, "nf4", seed=m)
    A = torch.randn(m, k_in, generator=torch.Generator().manual_seed(k_in)).to(dtype)
    out = F.matmul_4bit(A.cuda(), packed.cuda(), state.to("cuda"))
    assert_linear_close(out.cpu(), A, W, None, dtype)


_POOL_SCRIPT = r"""
import os, torch
import kbit.functional as F
torch.set_num_threads(2)
torch.ones(1 << 16).sum()  # torch's OpenMP team exists and has run
before = len(os.listdir("/proc/self/task"))
W = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
A = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
ref = F.matmul_4bit(A, packed, state)
started = len(os.listdir("/proc/self/task")) - before  # threads kbit started for its own pool
pid = os.fork()
if pid == 0:  # a forked child: libgomp's team is gone, kbit must use its own threads
    ok = torch.equal(F.matmul_4bit(A, packed, state), ref)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert torch.equal(F.matmul_4bit(A, packed, state), ref)
import hashlib
print(started, hashlib.sha256(ref.numpy().tobytes()).hexdigest())
"""


def test_openmp_team_own_threads_and_a_forked_child_give_the_same_bytes(run_python) -> None:
    """With torch loaded, the CPU library runs on torch's OpenMP team (parallel.cpp); with
    KBIT_CPU_OPENMP=0 on its own threads (the one it starts shows in /proc/self/task); in a fork()ed
    child on its own threads again. All finish (run_python's timeout catches a hang) and give the
    same bytes."""
    outs = []
    for env in ({}, {"KBIT_CPU_OPENMP": "0"}, {"KBIT_NUM_THREADS": "2"}):
        r = run_python("-c", _POOL_SCRIPT, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    started = [int(o.split()[0]) for o in outs]
    digests = {o.split()[1] for o in outs}
    assert started == [0, 1, 0] and len(digests) == 1, outs
