"""Portable native libraries: the symbol-version policy of the wheel, and the linker that meets it.

A library linked on a new distribution binds the newest glibc symbol versions its headers and
crt files name (Debian 12: GLIBC_2.34 for pthread_create, moved into libc in 2.34), so the wheel
would only install on glibc >= 2.34. kbit compiles with the toolkit's nvcc/g++ as before and does
only the final link with zig's clang/lld driver (PyPI `ziglang`, pinned by sha256 in
ci/requirements/zig.txt) against its glibc stubs for the policy's version: every library then
requires at most GLIBC_2.28 and no GLIBCXX/CXXABI/GCC version at all (the few C++ ABI helpers
the objects need, __cxa_guard_* for nvcc's kernel-handle statics, come from zig's static libc++abi).

    POLICY                      the one declaration of what the wheel may require (build and tests read it)
    ensure_zig(cache) -> Zig    the pinned zig, installed once into <cache>/tools/ (pip --require-hashes)
    zig_cmake_args(zig, ...)    the -D values that make CMakeLists.txt link with it

The zig binary is statically linked (no glibc of its own), so the same verified copy runs on the
host and, mounted read-only, in every build container; its cache of built libc stubs
(<cache>/zig, ZIG_GLOBAL_CACHE_DIR) is shared too: the first link ever takes about two minutes,
later ones well under a second.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import REPO, proc
from .errors import ToolkitUnavailable
from .locks import locked_requirements

__all__ = [
    "POLICY",
    "ZIG_LOCK",
    "SymbolPolicy",
    "Zig",
    "ensure_zig",
    "zig_cmake_args",
]

ZIG_LOCK = REPO / "ci" / "requirements" / "zig.txt"


@dataclass(frozen=True)
class SymbolPolicy:
    """What a library of the wheel may require from the system it runs on."""

    platform: str  # the wheel's platform tag, checked by auditwheel: "manylinux_2_28_x86_64"
    glibc: tuple[int, int]  # the newest GLIBC_x.y a library may require
    # Version families a library may not require at all: libstdc++ and libgcc_s are never needed
    # (the C++ runtime is linked statically), so any GLIBCXX_/CXXABI_/GCC_ need is a build mistake.
    forbidden: tuple[str, ...] = ("GLIBCXX", "CXXABI", "GCC")

    @property
    def zig_target(self) -> str:
        return f"x86_64-linux-gnu.{self.glibc[0]}.{self.glibc[1]}"

    def violations(self, needs: Mapping[str, tuple[str, ...]]) -> list[str]:
        """Each required version ({file: (version, ...)}, as ElfInfo.version_needs) the policy forbids."""
        bad = []
        for file, versions in sorted(needs.items()):
            for v in versions:
                family, _, number = v.partition("_")
                if family in self.forbidden:
                    bad.append(f"{file}: {v} (no {family} version may be required)")
                elif family == "GLIBC":
                    got = tuple(int(x) for x in re.findall(r"\d+", number))
                    if not got or got > self.glibc:
                        bad.append(f"{file}: {v} (newer than GLIBC_{self.glibc[0]}.{self.glibc[1]})")
                elif not v.startswith("GLIBC_PRIVATE"):
                    bad.append(f"{file}: {v} (not a glibc version)")
        return bad


POLICY = SymbolPolicy(platform="manylinux_2_28_x86_64", glibc=(2, 28))


@dataclass(frozen=True)
class Zig:
    root: Path  # <cache>/tools/ziglang-0.17.0 (a pip --target folder); the binary is root/ziglang/zig
    version: str  # "0.17.0"

    @property
    def exe(self) -> Path:
        return self.root / "ziglang" / "zig"

    def describe(self, policy: SymbolPolicy = POLICY) -> str:
        return f"zig {self.version} ({policy.zig_target})"


def _lock_digest(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def ensure_zig(cache: Path, lock: Path = ZIG_LOCK) -> Zig:
    """The locked ziglang wheel installed into <cache>/tools/ziglang-VERSION (once; pip checks the hash)."""
    version = locked_requirements(lock).get("ziglang")
    if version is None:
        raise ToolkitUnavailable(f"{lock} pins no ziglang")
    zig = Zig(root=cache / "tools" / f"ziglang-{version}", version=version)
    stamp = zig.root / "kbit-lock.json"
    want = {"lock_sha256": _lock_digest(lock)}
    try:
        ok = json.loads(stamp.read_text()) == want and zig.exe.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        with proc.step(f"zig {version} (hash-locked, {lock.relative_to(REPO) if lock.is_relative_to(REPO) else lock})"):
            shutil.rmtree(zig.root, ignore_errors=True)
            proc.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                      "--only-binary=:all:", "--require-hashes", "--target", zig.root, "-r", lock])
            if not zig.exe.is_file():
                raise ToolkitUnavailable(f"{zig.exe}: missing after installing {lock}")
            stamp.write_text(json.dumps(want))
    return zig


def zig_cmake_args(zig_exe: str | Path, cache: str | Path, policy: SymbolPolicy = POLICY) -> list[str]:
    """The CMake defines that make every kbit library link with `zig c++ -target <policy>`.

    Paths are as the build sees them (inside a container: its mount points)."""
    return [f"-DKBIT_ZIG={zig_exe}", f"-DKBIT_ZIG_CACHE_DIR={cache}", f"-DKBIT_ZIG_TARGET={policy.zig_target}"]
