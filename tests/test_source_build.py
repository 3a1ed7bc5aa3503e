"""The sdist `nox -s build` writes (dist/kbit-X.tar.gz), built and installed as a user whose platform or
GPU no wheel covers would:

    pip install kbit-X.tar.gz                 (no flags)

with a CUDA toolkit (CUDA_HOME, or nvcc on PATH) it builds the CPU library and one libkbit_cudaXY.so for
that toolkit (archs from its matrix row, plus KBIT_EXTRA_ARCHS); without one, the CPU library, saying so
at build time and in `python -m kbit`. Either installs and passes `python -m kbit verify` and the CPU
self-test. The sdist holds what a build needs and nothing of .cache/, build/ or dist/.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

from kbit_ci.matrix import load_matrix  # noqa: E402
from kbit_ci.toolkits import parse_nvcc_version  # noqa: E402

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
                   "ci/matrix.toml", "ci/matrix_query.py", "ci/write_manifest.py", "python/kbit/__init__.py"):
        assert needed in names, needed
    assert not any(n.endswith(".so") for n in names)


def _build_and_install(tmp: Path, env: dict[str, str], *defines: str) -> tuple[dict, Path, str]:
    """pip wheel from the sdist (this venv's build tools, no isolation), then the wheel unpacked on its
    own path; returns (its manifest, its site dir, the build's output)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "CUDA")) and k != "PATH"}
    full.update(env)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "wheel"), str(SDIST), f"-Cbuild-dir={tmp / 'build'}", *defines],
                       env=full, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp / "wheel").glob("kbit-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        manifest = json.loads(z.read("kbit/manifest.json"))
    for so in site.rglob("*.so"):
        so.chmod(0o755)
    return manifest, site, r.stdout + r.stderr


def _kbit(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-m", "kbit", *args], env=env, capture_output=True, text=True, timeout=300)


def _check_installed(site: Path, manifest: dict) -> None:
    r = _kbit(site, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(_kbit(site, "--json").stdout)
    assert Path(report["package_dir"]) == site / "kbit"
    assert report["self_test"][0]["device"] == "cpu" and report["self_test"][0]["max_relative_error"] < 0.05
    assert report["kbit"] == manifest["kbit_version"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_without_a_toolkit_the_sdist_builds_the_cpu_library_and_says_how_to_get_cuda(tmp_path) -> None:
    manifest, site, log = _build_and_install(tmp_path, {"PATH": NO_TOOLKIT_PATH})
    assert [e["file"] for e in manifest["libraries"]] == ["libkbit_cpu.so"]
    assert "without a CUDA toolkit" in manifest["note"] and "without a CUDA toolkit" in log
    _check_installed(site, manifest)
    assert "note: built from source without a CUDA toolkit" in _kbit(site, "--no-self-test").stdout


@pytest.mark.slow
@pytest.mark.skipif(CUDA is None, reason="no local CUDA toolkit (CUDA_HOME or /usr/local/cuda)")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_with_a_toolkit_the_sdist_builds_its_library(tmp_path) -> None:
    cuda, _, _ = parse_nvcc_version(subprocess.run([CUDA / "bin" / "nvcc", "--version"], capture_output=True,
                                                   text=True).stdout)
    row = {r.cuda: r for r in load_matrix()}.get(cuda)
    if row is None:
        pytest.skip(f"the local CUDA {cuda} has no matrix row")
    # CUDA_HOME only (nvcc not on PATH), and a Pascal card's arch on top of the row's
    manifest, site, _ = _build_and_install(tmp_path, {"PATH": NO_TOOLKIT_PATH, "CUDA_HOME": str(CUDA)},
                                           "-Ccmake.define.KBIT_EXTRA_ARCHS=61")
    libs = {e["file"]: e for e in manifest["libraries"]}
    assert set(libs) == {"libkbit_cpu.so", row.library} and "note" not in manifest
    entry = libs[row.library]
    assert entry["archs"] == ["61", *row.archs] and entry["ptx"] == [row.ptx]
    assert entry["toolkit"]["source"] == "local"
    _check_installed(site, manifest)
