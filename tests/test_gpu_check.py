"""tests/gpu_check.py (nox -s gpu), the command that validates the CUDA libraries on a GPU, run here
against the emulated CUDA library so that it does not rot: every step runs and is reported, a
planted kernel bug makes its step and the command fail; and its pure helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_check
import pytest
from cuda_emu.plants import PLANTS, planted_library

WHEEL = os.environ.get("KBIT_WHEEL")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="KBIT_WHEEL is not set (nox -s tests sets it)")
SCRIPT = Path(gpu_check.__file__)


def _check(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp / "gpu"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--wheel", WHEEL, "--out", str(out), *args], env=env,
                       capture_output=True, text=True, timeout=900)
    report = out / "gpu-report.md"
    return r, report.read_text() if report.exists() else ""


def _row(report: str, step: str) -> str:
    m = re.search(rf"^\| {re.escape(step)} \| (.*)$", report, re.M)
    assert m, f"no step {step!r} in the report:\n{report[:3000]}"
    return m.group(1)


@needs_wheel
@pytest.mark.slow
def test_every_step_runs_against_the_emulated_library(tmp_path) -> None:
    r, report = _check(tmp_path, "--emulated")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _row(report, "environment").startswith("ok")
    assert re.match(r"ok \| [\d.]+ s \| 0 passed, 0 failed, \d+ skipped", _row(report, "cuda tests 11.8"))
    assert re.match(r"ok \| [\d.]+ s \| libkbit_cuda_emu.so: (\d+) of \1 calls", _row(report, "kernels (emulated)"))
    assert _row(report, "kernels 13.0, PTX JIT").startswith("skipped")
    assert re.match(r"ok \| [\d.]+ s \| libkbit_cuda_emu.so: (\d+) of \1 calls",
                    _row(report, "sanitizers (emulated: AddressSanitizer + UBSan)"))
    assert _row(report, "benchmarks").startswith("ok")
    assert "| NF4 GEMV torch.bfloat16 | 1x256 . 8x256 |" in report and "| Adam8bit step fp32 |" in report


@needs_wheel
@pytest.mark.slow
def test_a_planted_kernel_bug_fails_the_command(tmp_path) -> None:
    plant = next(p for p in PLANTS if p.id == "wrong-shuffle-mask")
    lib = planted_library(plant, tmp_path)
    r, report = _check(tmp_path, "--emulated", str(lib), "--budget", "120")
    assert r.returncode == 1
    row = _row(report, "kernels (emulated)")
    assert row.startswith("**FAILED**") and "calls as the CPU library" in row
    assert "gemv4_kernel<0, true>" in report and ("does not name" in report or "reads lane 31" in report)


def test_ptx_and_device_helpers() -> None:
    info = {"driver": {"devices": [{"capability": [9, 0]}, {"capability": [12, 0]}]}}
    assert gpu_check.device_sm(info) == 90
    assert gpu_check.device_sm({"driver": {"devices": []}}) is None
    assert gpu_check.ptx_runs_on({"ptx": ["90"]}, 90) and gpu_check.ptx_runs_on({"ptx": ["80"]}, 90)
    assert not gpu_check.ptx_runs_on({"ptx": ["120"]}, 90) and not gpu_check.ptx_runs_on({"ptx": []}, 90)
    assert not gpu_check.ptx_runs_on({"ptx": ["90"]}, None)
    libs = gpu_check.bundled_libraries({"manifest": {"libraries": [{"file": "libkbit_cpu.so", "cuda": None},
                                                                   {"file": "libkbit_cuda124.so", "cuda": "12.4"}]}})
    assert [lib["file"] for lib in libs] == ["libkbit_cuda124.so"]


def test_junit_counts(tmp_path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert gpu_check._junit_counts(xml) == {"tests": 7, "failures": 1, "errors": 1, "skipped": 2}
