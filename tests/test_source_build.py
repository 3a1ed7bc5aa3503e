"""Building from source with a local CUDA, as a user without the fat wheel would:

    pip install . -C cmake.define.KBIT_CUDA=ON

gives a wheel with the CPU library and one libkbit_cudaXY.so for that toolkit (archs from its
matrix row), described by the same manifest and loaded by the same runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

from kbit_ci.matrix import load_matrix  # noqa: E402
from kbit_ci.toolkits import parse_nvcc_version  # noqa: E402


def _local_nvcc() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "bin" / "nvcc"
    return None


NVCC = _local_nvcc()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="no local CUDA toolkit (CUDA_HOME or /usr/local/cuda)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake"),
]


def test_pip_wheel_with_local_cuda(tmp_path):
    cuda, _, _ = parse_nvcc_version(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout)
    row = {r.cuda: r for r in load_matrix()}.get(cuda)
    if row is None:
        pytest.skip(f"the local CUDA {cuda} has no matrix row")
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO,
         "-Ccmake.define.KBIT_CUDA=ON", f"-Cbuild-dir={tmp_path / 'build'}"],
        check=True, env={**os.environ, "CUDACXX": str(NVCC)},
    )
    (wheel,) = out.glob("kbit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        manifest = json.loads(z.read("kbit/manifest.json"))
    libs = {e["file"]: e for e in manifest["libraries"]}
    assert set(libs) == {"libkbit_cpu.so", row.library}
    entry = libs[row.library]
    assert entry["archs"] == list(row.archs) and entry["ptx"] == [row.ptx]
    assert entry["toolkit"]["source"] == "local"
