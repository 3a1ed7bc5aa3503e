"""Builds libkbit_cuda_emu.so: every csrc/cuda/*.cu compiled as C++ by the host compiler against the
stand-ins of include/cuda_runtime.h, linked with runtime.cpp (fibers, checks, schedules) and
build_info.cpp. The library exports kbit.h's C ABI on host memory, so the tests call it through the
same ctypes bindings as libkbit_cpu.so. It is a test artifact: never part of a wheel.

Objects are cached by content (flags, the translation unit, every header it can include) under
build/cuda_emu/, so a second session, or a variant with one mutated file, recompiles only what
changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["HERE", "REPO", "EmuBuildError", "asan_runtime", "build", "compile_and_link", "cuda_sources"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "build" / "cuda_emu"

# As on the GPU path: no contraction of a*b+c (nvcc's __fmul_rn/__fadd_rn, the CPU library's ISO
# mode); the device branches of the shared headers (__CUDA_ARCH__) are the ones compiled.
COMMON = ["-std=c++17", "-fPIC", "-g", "-ffp-contract=off", "-fvisibility=hidden", "-Wall", "-Wextra",
          "-Wno-unknown-pragmas", "-D__CUDACC__", "-D__CUDA_ARCH__=900"]
PLAIN = ["-O2"]
SANITIZE = ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


class EmuBuildError(RuntimeError):
    """The host compiler failed on the emulated CUDA library (its output is the message)."""


def cuda_sources(root: Path) -> list[Path]:
    """The CUDA translation units of a source tree: every csrc/cuda/*.cu, except build_info.cu (the
    emulation reports its own build info)."""
    return sorted(p for p in (root / "csrc" / "cuda").glob("*.cu") if p.name != "build_info.cu")


def _headers(root: Path) -> list[Path]:
    dirs = [root / "csrc" / "include", root / "csrc" / "common", root / "csrc" / "cuda", HERE / "include"]
    return sorted(p for d in dirs for p in d.iterdir() if p.suffix in (".h", ".cuh"))


def _include_flags(root: Path) -> list[str]:
    # The stand-in cuda_runtime.h first: it must win over any real one on the system path.
    return [f"-I{HERE / 'include'}", f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc' / 'common'}",
            f"-I{root / 'csrc' / 'cuda'}"]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmuBuildError(f"{' '.join(cmd)}\nfailed ({r.returncode}):\n{r.stdout}{r.stderr}")


def compile_and_link(units: list[Path], *, flags: list[str], includes: list[str], headers: list[Path], root: Path,
                     cache: Path, output: str, link: list[str], compiler: str = "g++") -> Path:
    """Compiles each unit (as C++, from `root` with relative paths, so __FILE__ reads csrc/...) into an
    object cached by content (compiler, flags, the unit, every header it may include) under cache/, in
    parallel, and links them with `link` flags into cache/<content key>/<output>. Returns its path."""
    cxx = shutil.which(compiler)
    if cxx is None:
        raise EmuBuildError(f"no {compiler} on PATH: kbit's test harnesses are built with the host C++ compiler")
    header_bytes = b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in headers)
    objects_dir = cache / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)

    def compile_unit(source: Path) -> Path:
        rel = source.relative_to(root) if source.is_relative_to(root) else source
        key = _digest([cxx.encode(), " ".join(flags).encode(), str(rel).encode(), source.read_bytes(), header_bytes])
        obj = objects_dir / f"{source.stem}-{key}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            _run([cxx, *flags, *includes, "-x", "c++", "-c", str(rel), "-o", str(tmp)], cwd=root)
            tmp.replace(obj)
        return obj

    with ThreadPoolExecutor(max_workers=max(1, min(len(units), os.cpu_count() or 1))) as pool:
        objects = list(pool.map(compile_unit, units))
    out = cache / _digest([o.name.encode() for o in objects] + [" ".join(link).encode()]) / output
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        _run([cxx, *flags, *map(str, objects), *link, "-o", str(tmp)], cwd=root)
        tmp.replace(out)
    return out


def build(*, sanitize: bool, root: Path = REPO, cache: Path = CACHE, compiler: str = "g++") -> Path:
    """The emulated library of the CUDA sources under `root` (a tree with csrc/), with AddressSanitizer
    and UndefinedBehaviorSanitizer when `sanitize`. Returns its path (cached by content)."""
    return compile_and_link([*cuda_sources(root), HERE / "runtime.cpp", HERE / "build_info.cpp"],
                            flags=[*COMMON, *(SANITIZE if sanitize else PLAIN)], includes=_include_flags(root),
                            headers=_headers(root), root=root, cache=cache, output="libkbit_cuda_emu.so",
                            link=["-shared"], compiler=compiler)


def asan_runtime(compiler: str = "g++") -> str:
    """The AddressSanitizer runtime a process must preload to load the sanitized library."""
    r = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    path = r.stdout.strip()
    if not os.path.isabs(path):
        raise EmuBuildError(f"{compiler} does not know where libasan.so is ({path!r}): install its AddressSanitizer runtime")
    return path
