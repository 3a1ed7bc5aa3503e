"""One version everywhere: the wheel's name and METADATA, kbit.__version__ (kbit/_version.py, written at
build time from the git tag), the manifest's kbit_version and `python -m kbit`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEEL = os.environ.get("KBIT_WHEEL")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="KBIT_WHEEL is not set (nox -s tests sets it)")

# PEP 440 as setuptools-scm writes it with local_scheme = "no-local-version": 0.2.0, 0.2.1.dev3, 0.1.dev57
PUBLIC_VERSION = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?")


@needs_wheel
def test_one_version_everywhere(package_dir, run_python):
    import kbit

    wheel_version = Path(WHEEL).name.split("-")[1]
    with zipfile.ZipFile(WHEEL) as z:
        in_wheel = json.loads(z.read("kbit/manifest.json"))["kbit_version"]
        generated = z.read("kbit/_version.py").decode()
    manifest = json.loads((package_dir / "manifest.json").read_text())["kbit_version"]
    cli = run_python("-m", "kbit", "--json", "--no-self-test")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    reported = json.loads(cli.stdout)["kbit"]
    versions = {
        "wheel file name": wheel_version,
        "METADATA": metadata.version("kbit"),
        "kbit/_version.py in the wheel": re.search(r'version = "([^"]+)"', generated).group(1),
        "manifest in the wheel": in_wheel,
        "kbit.__version__": kbit.__version__,
        "installed manifest": manifest,
        "python -m kbit": reported,
    }
    assert len(set(versions.values())) == 1, versions
    assert PUBLIC_VERSION.fullmatch(kbit.__version__), "no local part: PyPI refuses it, slim wheels use it"
    assert (package_dir / "_version.py").is_file()


@needs_wheel
def test_text_report_names_the_version(run_python):
    import kbit

    out = run_python("-m", "kbit", "--no-self-test")
    assert out.stdout.startswith(f"kbit {kbit.__version__} ("), out.stdout
    assert "written for kbit" not in out.stdout


def test_version_is_read_lazily(run_python):
    out = run_python("-c", "import kbit; print('__version__' in vars(kbit)); v = kbit.__version__; "
                           "print('__version__' in vars(kbit), v == kbit.__version__, bool(v))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "True"]


@pytest.mark.parametrize("bad", ["0.1.0-dirty", "v0.2.0", "", "0.2.0+CU124", "latest"])
def test_manifest_writer_refuses_a_non_pep440_version(tmp_path, bad):
    out = subprocess.run([sys.executable, "-m", "ci.write_manifest", str(tmp_path), bad],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "not a PEP 440 version" in out.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_pyproject_takes_the_version_from_git():
    import tomllib

    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in py["project"] and py["project"]["dynamic"] == ["version"]
    assert py["tool"]["scikit-build"]["metadata"]["version"]["provider"] == "scikit_build_core.metadata.setuptools_scm"
    assert any(r.startswith("setuptools-scm") for r in py["build-system"]["requires"])
    (gen,) = py["tool"]["scikit-build"]["generate"]
    assert gen["path"] == "kbit/_version.py" and "${version}" in gen["template"]
    scm = py["tool"]["setuptools_scm"]
    assert scm["local_scheme"] == "no-local-version" and PUBLIC_VERSION.fullmatch(scm["fallback_version"])
