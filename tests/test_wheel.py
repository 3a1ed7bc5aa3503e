"""The built wheel as a user gets it: its name and contents, and a fresh venv that installs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("KBIT_WHEEL")
pytestmark = pytest.mark.skipif(not WHEEL, reason="KBIT_WHEEL is not set (nox -s tests sets it to the wheel in dist/)")


@pytest.fixture(scope="module")
def wheel() -> Path:
    return Path(WHEEL)


def test_one_wheel_for_every_cpython(wheel):
    assert re.fullmatch(r"kbit-[^-]+-py3-none-(manylinux|linux)[\w.]*x86_64\.whl", wheel.name), wheel.name


def test_wheel_contents_match_its_manifest(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("kbit/manifest.json"))
    libs = {n.split("/", 1)[1] for n in names if re.fullmatch(r"kbit/libkbit_\w+\.so", n)}
    assert "libkbit_cpu.so" in libs
    assert libs == {e["file"] for e in manifest["libraries"]}
    assert "kbit/__init__.py" in names and "kbit/__main__.py" in names
    # auditwheel must not have grafted anything: every dependency is the libc family or the driver.
    assert not [n for n in names if n.startswith("kbit.libs/")]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, symlinks=True).create(root)
    py = root / "bin" / "python"
    # --no-deps: the runtime and `python -m kbit` must work before torch is installed.
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return py


def test_fresh_venv_imports_kbit_without_torch(fresh_venv):
    out = subprocess.run(
        [fresh_venv, "-c", "import sys, kbit; print(kbit.__version__); print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd="/", check=True,
    )
    version, torch_loaded = out.stdout.split()
    assert version != "0+unknown"
    assert torch_loaded == "False"


def test_fresh_venv_python_m_kbit(fresh_venv):
    out = subprocess.run([fresh_venv, "-m", "kbit"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "libkbit_cpu.so" in out.stdout
    js = subprocess.run([fresh_venv, "-m", "kbit", "--json"], capture_output=True, text=True, cwd="/")
    assert js.returncode == 0, js.stderr
    report = json.loads(js.stdout)
    assert report["ok"] is True and report["errors"] == [], report["errors"]
    assert Path(report["package_dir"]).is_relative_to(fresh_venv.parents[1])  # the fresh venv's kbit
    assert report["cpu_library"]["build_info"]["backend"] == "cpu"
