"""Every CUDA kernel of csrc/cuda executed without a GPU, by the execution harness of tests/cuda_emu:
libkbit_cuda_emu.so (the CUDA sources compiled as C++ against stand-ins, CUDA blocks as fibers with
checked barriers and warp intrinsics) called through kbit's ctypes bindings on the same host buffers
as libkbit_cpu.so.

* every entry point, dtype and blocksize, partial last blocks, n = 1, NaN/inf blocks, GEMV's word and
  byte paths (odd k_in, blocks straddling rows, an unaligned `packed`), Adam and AdamW: byte for byte
  the CPU library's results (GEMV: both within kbit.h's float32-summation bound of the float64
  product), and byte-identical under every schedule (in order, reversed, seeded random) and grid cap
  (none, 1 and 3 blocks: the grid-stride loops);
* the same calls in a process with AddressSanitizer + UndefinedBehaviorSanitizer;
* planted bugs in copies of the real kernels (a removed barrier, a reused shared buffer, a wrong
  shuffle mask, a divergent or partial barrier, reads and writes past a buffer): the harness fails
  on each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_emu import build as emu_build
from cuda_emu.calls import Call, Emulation, run_call, save_calls
from cuda_emu.plants import PLANTS, Plant, planted_library
from cuda_emu.specs import KBIT_DTYPE, KERNEL_TEMPLATES, SPECS, Spec, judge, run_emulated
from kbit import KbitNativeError, _native

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation is built with g++")

# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu() -> _native.NativeLibrary:
    return _native.cpu_library()


@pytest.fixture(scope="module")
def emu() -> Emulation:
    return Emulation(_native.open_library(emu_build.build(sanitize=False), None))


# --- the kernels, byte for byte ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_kernel_matches_cpu_under_every_schedule(cpu, emu, spec: Spec) -> None:
    call = spec.make(cpu)
    cpu_out = run_call(cpu, call)
    emu_out = run_emulated(emu, call)
    problem = judge(spec, call, cpu_out, emu_out)
    assert problem is None, f"{call.id}: {problem}"


def test_grid_cap_makes_blocks_loop(emu, cpu) -> None:
    """With a cap of 1 and 3 blocks a launch runs exactly that many CUDA blocks, each looping over
    several quantization blocks (the grid-stride loops), with the same results."""
    spec = next(s for s in SPECS if s.id == "quantize_8bit-f32-bs64-n165")
    call = spec.make(cpu)
    blocks = {}
    for cap in (0, 1, 3):
        emu.configure(Emulation.IN_ORDER, 0, cap)
        out = run_call(emu.lib, call)
        blocks[cap] = emu.stats()["blocks"]
        assert judge(spec, call, run_call(cpu, call), out) is None
    assert blocks == {0: 3, 1: 1, 3: 3}
    assert emu.stats()["barriers"] > 3 * 3  # each quant block: the codebook's barrier and block_max's three


def test_build_info_and_abi(emu) -> None:
    assert emu.lib.backend == "cuda-emu"
    assert emu.lib.handle.kbit_abi_version() == _native.ABI_VERSION
    assert emu.lib.build_info["cuda"] is None and emu.lib.build_info["archs"] == []


def test_bad_launch_arguments_are_the_cpu_librarys_statuses(cpu, emu) -> None:
    """The shared argument checks run before any launch: the same statuses as the CPU library."""
    for lib in (cpu, emu.lib):
        with pytest.raises(KbitNativeError, match="unsupported blocksize"):
            lib.quantize_4bit(0, 1, 1, 1, 1, 10, 48, None)
        with pytest.raises(KbitNativeError, match="unsupported dtype"):
            lib.dequantize_blockwise_8bit(7, 1, 1, 1, 1, 10, 64, None)


# --- the same calls under AddressSanitizer and UndefinedBehaviorSanitizer ----------------------------------


def _sanitized_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "ASAN_", "UBSAN_"))}
    env["LD_PRELOAD"] = emu_build.asan_runtime()
    # Python's own allocations are not the kernels' business; leaks of the interpreter are not either.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PYTHONMALLOC"] = "malloc"
    return env


def run_sanitized(lib: Path, calls: list[Call], tmp: Path, schedule: int, seed: int = 0, grid_cap: int = 0):
    """Runs the calls in a fresh process with the sanitizers' runtime; returns (process, outputs)."""
    save_calls(tmp / "calls.npz", calls)
    script = Path(__file__).resolve().parent / "cuda_emu" / "calls.py"
    proc = subprocess.run([sys.executable, str(script), str(lib), str(tmp / "calls.npz"), str(tmp / "out.npz"),
                           "--schedule", str(schedule), "--seed", str(seed), "--grid-cap", str(grid_cap)],
                          env=_sanitized_env(), capture_output=True, text=True, timeout=900)
    outputs = {}
    if proc.returncode == 0:
        with np.load(tmp / "out.npz") as f:
            outputs = {k: f[k] for k in f.files}
    return proc, outputs


@pytest.mark.slow
def test_every_kernel_under_address_and_undefined_behavior_sanitizers(cpu, tmp_path) -> None:
    """All calls above in one sanitized process (random schedule, grid cap 3): no report, the CPU
    library's results, and every kernel of csrc/cuda launched for every dtype."""
    lib = emu_build.build(sanitize=True)
    calls = [(s, s.make(cpu)) for s in SPECS]
    assert len({c.id for _, c in calls}) == len(calls)
    proc, outputs = run_sanitized(lib, [c for _, c in calls], tmp_path, Emulation.RANDOM, seed=7, grid_cap=3)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for spec, call in calls:
        emu_out = {name: outputs[f"{call.id}/{name}"] for name in call.outputs}
        problem = judge(spec, call, run_call(cpu, call), emu_out)
        assert problem is None, f"{call.id}: {problem}"
    launched = json.loads(outputs["kernels"].tobytes())
    declared = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                              "".join(p.read_text() for p in emu_build.cuda_sources(emu_build.REPO))))
    assert declared == set(KERNEL_TEMPLATES), "a new kernel: add its calls to this file"
    for kernel in KERNEL_TEMPLATES:
        for dtype in KBIT_DTYPE.values():
            assert any(re.search(rf"::{kernel}<{dtype}\b", k) for k in launched), f"{kernel}<{dtype}> never ran"
    assert any("gemv4_kernel<0, true>" in k for k in launched) and any("gemv4_kernel<0, false>" in k for k in launched)


# --- planted bugs: the harness must fail -------------------------------------------------------------------


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.id)
def test_harness_catches_planted_bug(cpu, plant: Plant, tmp_path) -> None:
    spec = next(s for s in SPECS if s.id == plant.spec)
    call = spec.make(cpu)
    lib = planted_library(plant, tmp_path)
    if plant.sanitize:
        proc, _ = run_sanitized(lib, [call], tmp_path, Emulation.IN_ORDER)
        assert proc.returncode != 0, f"{plant.id}: the sanitized run passed"
        assert re.search(plant.expect, proc.stderr), proc.stderr[-4000:]
        return
    emu = Emulation(_native.open_library(lib, None))
    try:
        problem = judge(spec, call, run_call(cpu, call), run_emulated(emu, call))
    except KbitNativeError as e:
        problem = str(e)
        assert emu.last_failure() in problem
    except AssertionError as e:
        problem = str(e)
    assert problem is not None, f"{plant.id}: the harness passed a planted bug"
    assert re.search(plant.expect, problem), problem
