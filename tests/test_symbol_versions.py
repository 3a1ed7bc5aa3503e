"""Every native library of the wheel requires only symbol versions its manylinux tag allows.

The policy is declared once, in ci/kbit_ci/portable.py (POLICY): at most GLIBC_2.28, and no
GLIBCXX_/CXXABI_/GCC_ version at all (the C++ runtime is linked statically). The versions are read
from each library's .gnu.version_r with kbit._elf, whose reader is checked against objdump here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kbit._elf import read_elf

from ci.kbit_ci.portable import POLICY

REPO = Path(__file__).resolve().parents[1]


WHEEL = os.environ.get("KBIT_WHEEL")
needs_wheel = pytest.mark.skipif(
    not WHEEL, reason="KBIT_WHEEL is not set (nox -s tests sets it): the policy is the shipped wheel's"
)


def _wheel_libraries() -> list[str]:
    if not WHEEL:
        return []
    with zipfile.ZipFile(WHEEL) as z:
        return sorted(n for n in z.namelist() if re.fullmatch(r"kbit/libkbit_\w+\.so", n))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(WHEEL) as z:
        z.extractall(out, members=_wheel_libraries())
    return out


@needs_wheel
def test_the_wheel_carries_the_cpu_library():
    assert "kbit/libkbit_cpu.so" in _wheel_libraries()


def _member_cases() -> list:
    """One case per library of the wheel; without a wheel, one case skipped with the reason."""
    if not WHEEL:
        return [pytest.param(None, id="no-wheel", marks=needs_wheel)]
    return [pytest.param(n, id=n.rsplit("/", 1)[-1]) for n in _wheel_libraries()]


@pytest.mark.parametrize("member", _member_cases())
def test_library_needs_only_versions_the_policy_allows(extracted, member):
    needs = read_elf(extracted / member).version_needs
    assert needs.get("libc.so.6"), f"{member}: no GLIBC version needs read: the reader or the file is wrong"
    assert POLICY.violations(needs) == []


_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _tag_glibc(tag: str) -> tuple[int, int]:
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"(manylinux\d+)_x86_64", tag)
    if m and m.group(1) in _LEGACY:
        return _LEGACY[m.group(1)]
    raise AssertionError(f"not a manylinux x86_64 tag: {tag}")


@needs_wheel
def test_wheel_tags_are_the_policy_or_older():
    platforms = Path(WHEEL).name.removesuffix(".whl").split("-")[-1].split(".")
    assert POLICY.platform in platforms, platforms
    assert all(_tag_glibc(p) <= POLICY.glibc for p in platforms), platforms
    with zipfile.ZipFile(WHEEL) as z:
        (wheel_file,) = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")]
        tags = re.findall(r"^Tag: py3-none-(\S+)$", z.read(wheel_file).decode(), re.M)
    assert sorted(tags) == sorted(platforms)


@pytest.mark.parametrize(
    ("needs", "bad"),
    [
        ({"libc.so.6": ("GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.28")}, []),
        ({"libc.so.6": ("GLIBC_2.2.5", "GLIBC_2.34")}, ["libc.so.6: GLIBC_2.34"]),
        ({"libc.so.6": ("GLIBC_2.29",)}, ["libc.so.6: GLIBC_2.29"]),
        ({"libm.so.6": ("GLIBC_2.3",), "libstdc++.so.6": ("GLIBCXX_3.4", "CXXABI_1.3")},
         ["libstdc++.so.6: GLIBCXX_3.4", "libstdc++.so.6: CXXABI_1.3"]),
        ({"libgcc_s.so.1": ("GCC_3.0",)}, ["libgcc_s.so.1: GCC_3.0"]),
        ({"libfoo.so": ("FOO_1.0",)}, ["libfoo.so: FOO_1.0"]),
    ],
)
def test_policy_decides(needs, bad):
    got = POLICY.violations(needs)
    assert [g.split(" (")[0] for g in got] == bad


def test_policy_target_is_the_policy_glibc():
    assert POLICY.zig_target == "x86_64-linux-gnu.{}.{}".format(*POLICY.glibc)
    assert POLICY.platform == "manylinux_{}_{}_x86_64".format(*POLICY.glibc)


def _objdump_needs(path: Path) -> dict[str, tuple[str, ...]]:
    out = subprocess.run(["objdump", "-p", str(path)], capture_output=True, text=True, check=True).stdout
    needs: dict[str, set[str]] = {}
    current = None
    in_refs = False
    for line in out.splitlines():
        if line.startswith("Version References:"):
            in_refs = True
        elif in_refs and (m := re.match(r"\s+required from (\S+):", line)):
            current = needs.setdefault(m.group(1), set())
        elif in_refs and current is not None and (m := re.match(r"\s+0x[0-9a-f]+ 0x[0-9a-f]+ \d+ (\S+)", line)):
            current.add(m.group(1))
        elif in_refs and line.strip() and not line.startswith(" "):
            break
    return {k: tuple(sorted(v)) for k, v in needs.items()}


def _system_objects() -> list[Path]:
    found = [Path(sys.executable).resolve()]
    for name in ("libstdc++.so.6", "libz.so.1", "libssl.so.3"):
        for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64"):
            if (Path(d) / name).is_file():
                found.append((Path(d) / name).resolve())
                break
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to compare with")
@pytest.mark.parametrize("path", _system_objects(), ids=lambda p: p.name)
def test_reader_agrees_with_objdump(path):
    mine = {k: tuple(sorted(v)) for k, v in read_elf(path).version_needs.items()}
    assert mine == _objdump_needs(path)
