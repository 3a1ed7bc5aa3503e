"""The sdist `nox -s build` writes (dist/kbit-X.tar.gz), built and installed as a user whose platform or
GPU no wheel covers would:

    pip install kbit-X.tar.gz                 (no flags)

with a CUDA toolkit (CUDA_HOME, or nvcc on PATH) it builds the CPU library and one libkbit_cudaXY.so for
that toolkit (archs from its matrix row, plus KBIT_EXTRA_ARCHS); without one, the CPU library, saying so
at build time and in `python -m kbit`. Either installs and passes `python -m kbit verify` and the CPU
self-test in a fresh venv. The sdist holds what a build needs and nothing of .cache/, build/ or dist/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ci.kbit_ci.matrix import load_matrix
from ci.kbit_ci.toolkits import parse_nvcc_version

REPO = Path(__file__).resolve().parents[1]


WHEEL = os.environ.get("KBIT_WHEEL")
SDIST = next(iter(sorted(Path(WHEEL).parent.glob("kbit-*.tar.gz"))), None) if WHEEL else None
pytestmark = pytest.mark.skipif(SDIST is None, reason="no sdist beside KBIT_WHEEL (nox -s build writes both)")


def _local_cuda() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    return None


CUDA = _local_cuda()
NO_TOOLKIT_PATH = os.pathsep.join(d for d in ("/usr/bin", "/bin") if Path(d).is_dir())


def test_the_sdist_holds_the_sources_and_nothing_built() -> None:
    with tarfile.open(SDIST) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    top = {n.split("/", 1)[0] for n in names}
    assert not top & {".cache", "build", "dist", ".nox"}, top
    for needed in ("CMakeLists.txt", "pyproject.toml", "PKG-INFO", "csrc/include/kbit.h", "csrc/cuda/gemv.cu",
                   "ci/matrix.toml", "ci/__init__.py", "ci/matrix_query.py", "ci/write_manifest.py",
                   "ci/kbit_ci/manifest.py", "python/kbit/__init__.py"):
        assert needed in names, needed
    assert not any(n.endswith(".so") for n in names)


def _build_and_install(tmp: Path, env: dict[str, str], *defines: str) -> tuple[dict, Path, str]:
    """pip wheel from the sdist (this venv's build tools, no isolation), then pip install of that wheel
    into a fresh venv (torch borrowed from this one by a .pth line, for the self-test); returns (its
    manifest, the venv's python, the build's output)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "CUDA")) and k != "PATH"}
    full.update(env)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "wheel"), str(SDIST), f"-Cbuild-dir={tmp / 'build'}", *defines],
                       env=full, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp / "wheel").glob("kbit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        manifest = json.loads(z.read("kbit/manifest.json"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    # torch only after kbit is in: pip would otherwise see this venv's kbit through the borrowed path
    import torch

    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "zz-borrowed-torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    return manifest, python, r.stdout + r.stderr


def _kbit(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "PYTHON"))}
    return subprocess.run([str(python), "-m", "kbit", *args], env=env, capture_output=True, text=True, timeout=300)


def _check_installed(python: Path, manifest: dict) -> None:
    r = _kbit(python, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(_kbit(python, "--json").stdout)
    assert Path(report["package_dir"]).is_relative_to(python.parents[1])  # the fresh venv's kbit
    assert report["self_test"][0]["device"] == "cpu" and report["self_test"][0]["max_relative_error"] < 0.05
    assert report["kbit"] == manifest["kbit_version"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_without_a_toolkit_the_sdist_builds_the_cpu_library_and_says_how_to_get_cuda(tmp_path) -> None:
    manifest, python, log = _build_and_install(tmp_path, {"PATH": NO_TOOLKIT_PATH})
    assert [e["file"] for e in manifest["libraries"]] == ["libkbit_cpu.so"]
    assert "without a CUDA toolkit" in manifest["note"] and "without a CUDA toolkit" in log
    _check_installed(python, manifest)
    assert "note: built from source without a CUDA toolkit" in _kbit(python, "--no-self-test").stdout


@pytest.mark.slow
@pytest.mark.skipif(CUDA is None, reason="no local CUDA toolkit (CUDA_HOME or /usr/local/cuda)")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_with_a_toolkit_the_sdist_builds_its_library(tmp_path) -> None:
    cuda, _, _ = parse_nvcc_version(subprocess.run([CUDA / "bin" / "nvcc", "--version"], capture_output=True,
                                                   text=True).stdout)
    row = {r.cuda: r for r in load_matrix()}.get(cuda)
    if row is None:
        pytest.skip(f"the local CUDA {cuda} has no matrix row")
    # CUDA_HOME only (nvcc not on PATH), and the arch of a GPU the row lacks (one this nvcc knows: 13.x
    # dropped Pascal's sm_61, which a 12.x toolkit would take)
    extra = next(a for a in ("61", "87", "103") if a not in row.archs and (a != "61" or cuda.major < 13))
    manifest, python, _ = _build_and_install(tmp_path, {"PATH": NO_TOOLKIT_PATH, "CUDA_HOME": str(CUDA)},
                                             f"-Ccmake.define.KBIT_EXTRA_ARCHS={extra}")
    libs = {e["file"]: e for e in manifest["libraries"]}
    assert set(libs) == {"libkbit_cpu.so", row.library} and "note" not in manifest
    entry = libs[row.library]
    assert entry["archs"] == sorted([extra, *row.archs], key=int) and entry["ptx"] == [row.ptx]
    assert entry["toolkit"]["source"] == "local"
    _check_installed(python, manifest)


@pytest.mark.skipif(CUDA is None, reason="no local CUDA toolkit (CUDA_HOME or /usr/local/cuda)")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_an_arch_the_toolkit_cannot_build_is_refused_up_front(tmp_path) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "CUDA")) and k != "PATH"}
    full.update({"PATH": NO_TOOLKIT_PATH, "CUDA_HOME": str(CUDA)})
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheel"), str(SDIST), f"-Cbuild-dir={tmp_path / 'build'}",
                        "-Ccmake.define.KBIT_EXTRA_ARCHS=35"], env=full, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "KBIT_EXTRA_ARCHS=35" in r.stdout + r.stderr and "cannot build for sm_35" in r.stdout + r.stderr
