"""The CPU library's runtime-dispatched SIMD kernels (AVX2 where the CPU has it) and its portable loops
(KBIT_CPU_SIMD=0, read on every call) give bit-identical results, edge values included. On a CPU
without AVX2 both runs take the portable path and the test still checks determinism."""

from __future__ import annotations

import pytest
import torch
from kbit import functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def edge_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random normals with NaN, ±inf, ±0, subnormal-sized values, an all-zero block and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    idx = torch.randint(0, n, (n // 50,), generator=g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 1e30])
    x[idx] = specials[torch.randint(0, len(specials), (len(idx),), generator=g)]
    x[256:512] = 0.0
    return x.to(dtype)


def both_paths(monkeypatch, fn):
    monkeypatch.delenv("KBIT_CPU_SIMD", raising=False)
    fast = fn()
    monkeypatch.setenv("KBIT_CPU_SIMD", "0")
    portable = fn()
    monkeypatch.delenv("KBIT_CPU_SIMD")
    return fast, portable


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included)."""
    if a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise8_paths_agree(monkeypatch, dtype: torch.dtype, blocksize: int) -> None:
    A = edge_values(3 * 4096 + 77, dtype, seed=blocksize)
    (q1, s1), (q2, s2) = both_paths(monkeypatch, lambda: F.quantize_blockwise(A, blocksize=blocksize))
    assert same(q1, q2) and same(s1.absmax, s2.absmax)
    d1, d2 = both_paths(monkeypatch, lambda: F.dequantize_blockwise(q1, s1))
    assert same(d1, d2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_blockwise4_paths_agree(monkeypatch, dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    A = edge_values(3 * 4096 + 77, dtype, seed=blocksize + len(quant_type))
    (q1, s1), (q2, s2) = both_paths(monkeypatch, lambda: F.quantize_4bit(A, blocksize, quant_type))
    assert same(q1, q2) and same(s1.absmax, s2.absmax)
    d1, d2 = both_paths(monkeypatch, lambda: F.dequantize_4bit(q1, s1))
    assert same(d1, d2)
