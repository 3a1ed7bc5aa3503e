"""libkbit_cpu.so on the x86-64 CPUs CI may land on, not just this one: the entry points run natively,
natively with the portable loops (KBIT_CPU_SIMD=0), and as other CPUs under qemu-x86_64 -cpu MODEL
(Nehalem: SSE4.2, no AVX; Haswell: AVX2 + FMA, no AVX-512) give the same bytes and no SIGILL.

qemu is evidence only where it enforces the model: a planted program that executes an AVX2
instruction must die of SIGILL as a Nehalem, and the CPUID a process sees (read as the library reads
it) must be the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cpu_paths import Cpu, expected_path, host_cpu
from kbit import functional as F

QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it)"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 CPU models"),
]
PROBE = Path(__file__).resolve().parent / "cpu_probe.py"
# model: (AVX2, FMA, AVX-512F) as its CPUID says
MODELS = {"Nehalem": (0, 0, 0), "Haswell": (1, 1, 0)}


def model_cpu(model: str) -> Cpu:
    """The model's /proc/cpuinfo flags as far as kbit's dispatch reads them (tests/cpu_paths.py)."""
    avx2, fma, avx512 = MODELS[model]
    names = (("avx", "avx2") if avx2 else ()) + (("fma",) if fma else ()) + (("avx512f",) if avx512 else ())
    return Cpu(frozenset(names))

# What the library's dispatch reads (csrc/cpu/cpu_features.h): CPUID leaf 1 (AVX, FMA, OSXSAVE),
# XGETBV (YMM state), leaf 7 (AVX2, AVX-512F).
FEATURES_C = r"""
#include <cpuid.h>
#include <stdio.h>
int main(void) {
  unsigned a, b, c, d, lo = 0, hi = 0;
  __get_cpuid(1, &a, &b, &c, &d);
  int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
  if (osxsave) __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  int ymm = (lo & 6u) == 6u;
  __get_cpuid_count(7, 0, &a, &b, &c, &d);
  printf("%d %d %d\n", avx && ymm && ((b >> 5) & 1), avx && ymm && fma, (b >> 16) & 1);
  return 0;
}
"""
# An AVX2 instruction executed unconditionally.
AVX2_C = r"""
int main(void) {
  __asm__ volatile("vpaddd %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");
  return 0;
}
"""


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> dict[str, Path]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler for the qemu checks")
    d = tmp_path_factory.mktemp("cpu_models")
    out = {}
    for name, src in (("features", FEATURES_C), ("avx2", AVX2_C)):
        (d / f"{name}.c").write_text(src)
        subprocess.run([cc, "-O1", "-o", str(d / name), str(d / f"{name}.c")], check=True)
        out[name] = d / name
    books = d / "codebooks.bin"
    books.write_bytes(F.dynamic_map(signed=True).numpy().tobytes() + F.dynamic_map(signed=False).numpy().tobytes())
    out["codebooks"] = books
    return out


def _cpu_library() -> Path:
    from kbit import _native

    return Path(_native.cpu_library().path)


def _run(cmd: list, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    full.update(env or {})
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full, timeout=timeout)


@pytest.mark.parametrize("model", MODELS)
def test_qemu_enforces_the_model(tools, model: str) -> None:
    features = _run([QEMU, "-cpu", model, tools["features"]])
    assert features.returncode == 0, features.stderr
    assert tuple(map(int, features.stdout.split())) == MODELS[model]
    avx2 = _run([QEMU, "-cpu", model, tools["avx2"]])
    if MODELS[model][0]:
        assert avx2.returncode == 0, avx2.stderr
    else:
        assert avx2.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (avx2.returncode, avx2.stderr)


def _probe(tools, prefix: list = (), env: dict | None = None, cpu: Cpu | None = None) -> dict[str, str]:
    """The probe's digests, after checking that every call ran the kernel `cpu` (default: this
    machine's) and KBIT_CPU_SIMD call for."""
    r = _run([*prefix, sys.executable, PROBE, _cpu_library(), tools["codebooks"]], env=env)
    where = " ".join(map(str, prefix)) or "natively"
    assert r.returncode == 0, f"{where}: exit {r.returncode}\n{r.stderr[-3000:]}"
    result = json.loads(r.stdout)
    simd = (env or {}).get("KBIT_CPU_SIMD")
    cpu = cpu or host_cpu()
    wrong = [(p["ran"], expected_path(cpu, p["call"], simd, **p["shape"])) for p in result["paths"]]
    wrong = sorted({(ran, want) for ran, want in wrong if ran != want})
    assert result["paths"] and not wrong, f"{where}, KBIT_CPU_SIMD={simd}: (ran, expected) {wrong}"
    return result["digests"]


@pytest.fixture(scope="module")
def native(tools) -> dict[str, dict[str, str]]:
    """Digests of this CPU's runs: the default (every SIMD level the CPU has), capped at AVX2, and the
    portable loops."""
    return {"default": _probe(tools), "avx2": _probe(tools, env={"KBIT_CPU_SIMD": "avx2"}),
            "portable": _probe(tools, env={"KBIT_CPU_SIMD": "0"})}


def _differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    assert sorted(a) == sorted(b)
    return sorted(k for k in a if a[k] != b[k])


def test_portable_loops_give_the_same_bytes(native) -> None:
    """Every entry point is bit-identical on every path except the GEMV and the matmuls, whose SIMD
    kernels sum with FMA in their own order (kbit.h: "the summation order is the kernel's"; every path
    is checked against the float64 product in test_kernels_gemv.py and test_kernels_matmul.py). Above
    AVX2 only the matmuls have kernels of their own (AVX-512, AVX-512-BF16); the 8-bit dequantize's
    AVX-512 loop gives the same bytes."""
    differ = _differ(native["default"], native["portable"])
    assert all(k.startswith(("gemv/", "matmul/", "tiled/")) for k in differ), differ
    above_avx2 = _differ(native["default"], native["avx2"])
    assert all(k.startswith(("matmul/", "tiled/")) for k in above_avx2), above_avx2


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_other_cpu_gives_the_same_bytes(tools, native, model: str) -> None:
    """As a CPU without AVX (Nehalem) the library runs its portable loops, as an AVX2 CPU (Haswell) its
    AVX2 kernels: the same bytes as this machine's run of the same path (KBIT_CPU_SIMD=avx2 here, so
    an AVX-512 host compares like with like)."""
    theirs = _probe(tools, prefix=[QEMU, "-cpu", model], cpu=model_cpu(model))
    same_path = native["avx2" if MODELS[model][0] else "portable"]
    differ = _differ(same_path, theirs)
    assert not differ, f"as a {model}, these outputs differ from this machine's: {differ}"
