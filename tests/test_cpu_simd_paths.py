"""The CPU library's runtime-dispatched SIMD kernels (AVX2, AVX-512 where the CPU has them) and its
portable loops (KBIT_CPU_SIMD=0, read on every call) give bit-identical results, edge values included;
and each run took the path this CPU's flags and KBIT_CPU_SIMD call for (kbit_last_path(), against
cpu_paths.expected_path), so a dispatch that always fell back to the portable loops fails here. On a
CPU without AVX2 every run must say "portable" and the test still checks determinism."""

from __future__ import annotations

import pytest
import torch
from cpu_paths import expected_path, host_cpu
from kbit import _native
from kbit import functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIMD = {"default": None, "avx2": "avx2", "portable": "0"}
CPU = host_cpu()


def edge_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random normals with NaN, ±inf, ±0, subnormal-sized values, an all-zero block and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    idx = torch.randint(0, n, (n // 50,), generator=g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 1e30])
    x[idx] = specials[torch.randint(0, len(specials), (len(idx),), generator=g)]
    x[256:512] = 0.0
    return x.to(dtype)


def every_path(monkeypatch, fn, entry: str, **shape):
    """fn() under KBIT_CPU_SIMD unset, =avx2 and =0: the results, each run checked to have taken the
    path expected_path names for kbit_<entry>."""
    lib = _native.cpu_library()
    results = []
    for name, value in SIMD.items():
        if value is None:
            monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
        else:
            monkeypatch.setenv("KBIT_CPU_SIMD", value)
        results.append(fn())
        want = expected_path(CPU, entry, value, **shape)
        assert lib.last_path() == want, f"KBIT_CPU_SIMD {name}: the library ran {lib.last_path()!r}, not {want!r}"
    monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    return results


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included)."""
    if a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise8_paths_agree(monkeypatch, dtype: torch.dtype, blocksize: int) -> None:
    A = edge_values(3 * 4096 + 77, dtype, seed=blocksize)
    (q1, s1), *others = every_path(monkeypatch, lambda: F.quantize_blockwise(A, blocksize=blocksize),
                                   "quantize_blockwise_8bit", n=A.numel())
    assert all(same(q1, q) and same(s1.absmax, s.absmax) for q, s in others)
    d1, *others = every_path(monkeypatch, lambda: F.dequantize_blockwise(q1, s1), "dequantize_blockwise_8bit")
    assert all(same(d1, d) for d in others)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_blockwise4_paths_agree(monkeypatch, dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    A = edge_values(3 * 4096 + 77, dtype, seed=blocksize + len(quant_type))
    (q1, s1), *others = every_path(monkeypatch, lambda: F.quantize_4bit(A, blocksize, quant_type), "quantize_4bit")
    assert all(same(q1, q) and same(s1.absmax, s.absmax) for q, s in others)
    d1, *others = every_path(monkeypatch, lambda: F.dequantize_4bit(q1, s1), "dequantize_4bit")
    assert all(same(d1, d) for d in others)


def test_a_small_8bit_quantize_searches_per_value(monkeypatch) -> None:
    """Below 16384 values the 8-bit quantize searches the codebook per value (no grid table, no
    AVX2 kernel) on every path: the same bytes."""
    A = edge_values(4096 + 5, torch.float32, seed=3)
    (q1, s1), *others = every_path(monkeypatch, lambda: F.quantize_blockwise(A), "quantize_blockwise_8bit",
                                   n=A.numel())
    assert all(same(q1, q) and same(s1.absmax, s.absmax) for q, s in others)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_runs_its_one_path(monkeypatch, dtype: torch.dtype) -> None:
    """The 8-bit Adam step has no SIMD kernel of its own: every run says portable, with the same bytes."""
    n = 5000
    p0 = edge_values(n, torch.float32, seed=11).nan_to_num(0.0, 1.0, -1.0).clamp(-10, 10).to(dtype)
    g = (torch.randn(n, generator=torch.Generator().manual_seed(12)) * 0.1).to(dtype)

    def step():
        p = p0.clone()
        s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        a1, a2 = torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))
        torch.ops.kbit.adam_8bit_blockwise(p, g, s1, s2, a1, a2, F.dynamic_map(signed=True),
                                           F.dynamic_map(signed=False), 0.9, 0.999, 1e-8, 0.0, 1e-3, 1, 1.0, True)
        return p, s1, s2

    first, *others = every_path(monkeypatch, step, "adam_8bit_blockwise")
    assert all(same(a, b) for o in others for a, b in zip(first, o))


def test_the_path_is_the_calling_threads(monkeypatch) -> None:
    """kbit_last_path() is per thread: another thread's call does not change this thread's record, and
    a call that returns before running a kernel (n = 0, a bad argument) leaves it as it was."""
    import threading

    monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    lib = _native.cpu_library()
    A = torch.randn(4096)
    F.dequantize_blockwise(*F.quantize_blockwise(A))
    mine = lib.last_path()
    assert mine == expected_path(CPU, "dequantize_blockwise_8bit")
    theirs = []

    def other() -> None:
        theirs.append(lib.last_path())
        F.quantize_4bit(A)
        theirs.append(lib.last_path())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert theirs == ["", expected_path(CPU, "quantize_4bit")]
    lib.quantize_4bit(0, 1, None, None, None, 0, 64, None)  # n = 0: nothing to do
    assert lib.handle.kbit_quantize_4bit(9, 1, None, None, None, 8, 64, None) == 2  # a bad dtype
    assert lib.last_path() == mine
