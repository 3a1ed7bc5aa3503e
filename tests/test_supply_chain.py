"""Every toolkit input is pinned and verified: PyPI files by sha256 locks pip enforces, Debian
packages by exact version through apt, whose signature checks nothing here turns off."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from ci.kbit_ci import debian, locks
from ci.kbit_ci.errors import ToolkitUnavailable
from ci.kbit_ci.locks import locked_requirements
from ci.kbit_ci.matrix import load_matrix
from ci.kbit_ci.portable import ZIG_LOCK

REPO = Path(__file__).resolve().parents[1]


ROWS = load_matrix()
PYPI_ROWS = [r for r in ROWS if r.pypi]


@pytest.mark.parametrize("row", PYPI_ROWS, ids=lambda r: r.id)
def test_pypi_rows_have_a_lock_that_pins_the_matrix_versions(row):
    lock = locks.pypi_lock(row)
    assert locked_requirements(lock) == {n.lower(): v for n, v in row.pypi.packages.items()}


def test_a_lock_that_disagrees_with_the_matrix_fails():
    row = PYPI_ROWS[0]
    bumped = replace(row, pypi=replace(row.pypi, packages=MappingProxyType(
        {**row.pypi.packages, "nvidia-cuda-nvcc": "13.0.99"})))
    with pytest.raises(ToolkitUnavailable, match="locks"):
        locks.pypi_lock(bumped)


def test_zig_is_locked():
    assert set(locked_requirements(ZIG_LOCK)) == {"ziglang"}


def test_every_lock_entry_carries_a_sha256(tmp_path):
    for lock in sorted((REPO / "ci" / "requirements").glob("*.txt")):
        locked_requirements(lock)  # raises on an entry without --hash=sha256
    bad = tmp_path / "bad.txt"
    bad.write_text("ziglang==0.17.0\n")
    with pytest.raises(ValueError, match="--hash"):
        locked_requirements(bad)
    loose = tmp_path / "loose.txt"
    loose.write_text("ziglang>=0.17 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(ValueError):
        locked_requirements(loose)


_INSECURE = re.compile(r"trusted=yes|allow-insecure|allow-unauthenticated|AllowInsecure|AllowUnauthenticated"
                       r"|--no-check-gpg|Check-Signature|--trusted-host", re.I)


VERIFYING_FILES = [*sorted((REPO / "docker").glob("*.Dockerfile")), *sorted((REPO / "ci" / "kbit_ci").glob("*.py"))]


@pytest.mark.parametrize("path", VERIFYING_FILES, ids=lambda p: p.name)
def test_nothing_turns_apt_or_pip_verification_off(path):
    assert not _INSECURE.search(path.read_text())


def test_private_apt_sources_name_the_keyring():
    text = debian.debian_sources_list("http://m.example/debian", ["bookworm", "experimental"],
                                        undated=["experimental"])
    for line in text.splitlines():
        assert f"signed-by={debian.DEBIAN_KEYRING}" in line and not _INSECURE.search(line)


@pytest.mark.parametrize("row", [r for r in ROWS if r.debian], ids=lambda r: r.id)
def test_debian_toolkit_pins_are_exact_versions(row):
    for name, version in row.debian.packages.items():
        assert re.fullmatch(r"[0-9][\w.+~:-]*", version), (name, version)
