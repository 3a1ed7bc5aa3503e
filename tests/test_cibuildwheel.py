"""cibuildwheel kept honest: what it would build, and with which options, is what pyproject.toml says.

No container is started: `--print-build-identifiers` and cibuildwheel's own option reader need none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["cibuildwheel"]


def _cibuildwheel() -> str:
    here = Path(sys.executable).parent / "cibuildwheel"
    exe = str(here) if here.is_file() else shutil.which("cibuildwheel")
    if exe is None:
        pytest.skip("cibuildwheel is not installed (the test session installs it)")
    return exe


def _clean_env() -> dict[str, str]:
    """The environment without CIBW_* overrides: pyproject alone decides."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}


def test_build_identifiers():
    out = subprocess.run([_cibuildwheel(), "--print-build-identifiers", "--platform", "linux"],
                         cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # One py3-none wheel serves every CPython: one identifier, the one pyproject names.
    assert out.stdout.split() == [CONFIG["build"]] == ["cp311-manylinux_x86_64"]


@pytest.fixture(scope="module")
def options():
    pytest.importorskip("cibuildwheel")
    from cibuildwheel.options import CommandLineArguments, compute_options

    args = CommandLineArguments.defaults()
    args.platform = "linux"
    args.package_dir = REPO
    cwd = os.getcwd()
    os.chdir(REPO)  # cibuildwheel reads {package}/pyproject.toml relative to the working directory
    try:
        opts = compute_options("linux", args, env=_clean_env())
        return opts.build_options(CONFIG["build"])
    finally:
        os.chdir(cwd)


def test_manylinux_image(options):
    assert CONFIG["manylinux-x86_64-image"] == "manylinux_2_28"
    image = options.manylinux_images["x86_64"]
    assert "manylinux_2_28_x86_64" in image, image


def test_repair_excludes_the_driver(options):
    # nox's wheel is checked by what it holds (tests/test_wheel.py: nothing grafted into kbit.libs/).
    assert options.repair_command == CONFIG["repair-wheel-command"]
    from ci.build import NEVER_BUNDLED, repair_command

    nox_repair = repair_command(Path("w.whl"), Path("d"))
    for lib in NEVER_BUNDLED:
        assert f"--exclude {lib}" in options.repair_command
        assert ["--exclude", lib] == nox_repair[nox_repair.index(lib) - 1:nox_repair.index(lib) + 1]


def test_staged_libraries_and_engine(options):
    assert options.before_all == CONFIG["before-all"]
    assert "build/stage/libkbit_cuda*.so" in options.before_all
    assert options.container_engine.name == CONFIG["container-engine"] in ("docker", "podman")
    env = options.environment.as_dictionary(prev_environment={})
    assert env["KBIT_STAGED_DIR"] == "/project/build/stage"
    assert "cmake.define.KBIT_STAGED_DIR=/project/build/stage" in options.config_settings
    assert options.test_command == CONFIG["test-command"]
    assert options.build_frontend.name == "build"


def test_podman_override():
    """CIBW_CONTAINER_ENGINE=podman (the build hosts' engine) is honoured over pyproject's docker."""
    pytest.importorskip("cibuildwheel")
    from cibuildwheel.options import CommandLineArguments, compute_options

    args = CommandLineArguments.defaults()
    args.platform = "linux"
    args.package_dir = REPO
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        opts = compute_options("linux", args, env={**_clean_env(), "CIBW_CONTAINER_ENGINE": "podman"})
    finally:
        os.chdir(cwd)
    assert opts.build_options(CONFIG["build"]).container_engine.name == "podman"
