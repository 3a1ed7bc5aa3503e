"""`python -m kbit verify` on a copy of the package: clean, corrupted, mislabelled, unlisted, no manifest."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from built_libraries import copy_package, cuda_libraries

REPO = Path(__file__).resolve().parents[1]


def _source_package() -> Path:
    spec = importlib.util.find_spec("kbit")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))).resolve()


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the package with the CPU library and the built CUDA libraries (the installed wheel's,
    else build/stage's current ones, see built_libraries), and a manifest written for them."""
    source = _source_package()
    pkg = tmp_path / "kbit"
    copy_package(source, pkg, cuda_libraries(source)[0])
    return pkg


def verify(pkg: Path) -> tuple[int, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "PYTHON"))}
    env["PYTHONPATH"] = str(pkg.parent)
    r = subprocess.run([sys.executable, "-S", "-m", "kbit", "verify"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].endswith("manifest.json")
    return r.returncode, {line.split()[1]: line for line in lines[:-1]}


def test_clean_copy_verifies(package: Path) -> None:
    status, lines = verify(package)
    assert set(lines) == {p.name for p in package.glob("libkbit_*.so")}
    assert all(line.startswith("ok ") for line in lines.values()), lines
    assert status == 0


def _target(package: Path) -> Path:
    cuda = sorted(package.glob("libkbit_cuda*.so"))
    return cuda[0] if cuda else package / "libkbit_cpu.so"


def test_corrupted_library_fails(package: Path) -> None:
    lib = _target(package)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    lib.write_bytes(bytes(data))
    status, lines = verify(package)
    assert status == 1
    assert lines[lib.name].startswith("FAILED") and "sha256" in lines[lib.name] and "bytes" not in lines[lib.name]


def test_manifest_archs_must_match_the_fatbin(package: Path) -> None:
    lib = _target(package)
    manifest = json.loads((package / "manifest.json").read_text())
    for e in manifest["libraries"]:
        if e["file"] == lib.name:
            e["archs"], e["ptx"] = ["61"], ["61"]
    (package / "manifest.json").write_text(json.dumps(manifest))
    status, lines = verify(package)
    assert status == 1
    assert "cubin archs" in lines[lib.name] and "the manifest says 61" in lines[lib.name]


def test_unlisted_and_missing_libraries_fail(package: Path) -> None:
    shutil.copy2(package / "libkbit_cpu.so", package / "libkbit_extra.so")
    lib = _target(package)
    lib.unlink()
    status, lines = verify(package)
    assert status == 1
    assert "not listed in the manifest" in lines["libkbit_extra.so"]
    assert "missing from" in lines[lib.name]


def test_missing_manifest_fails(package: Path) -> None:
    (package / "manifest.json").unlink()
    status, lines = verify(package)
    assert status == 1 and "is missing" in lines["manifest.json"]
