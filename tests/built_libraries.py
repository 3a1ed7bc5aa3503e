"""The real CUDA libraries a test can use: the installed package's, else (a dev layout, which has only
the CPU library) the ones `nox -s build` staged in build/stage/.

The package's own libraries are taken as they are: one that lacks a symbol the runtime binds is a
broken package, and the test using it fails. A staged library is a convenience of the dev layout and
may predate the runtime (built before new kernels were bound): such a library is left out, with the
reason, so a test skips the cases that need it and says which library to rebuild.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["STAGE", "copy_package", "cuda_libraries"]

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "build" / "stage"


def cuda_libraries(package: Path) -> tuple[list[Path], dict[str, str]]:
    """(the usable CUDA libraries, {file name: why it is left out})."""
    found = sorted(package.glob("libkbit_cuda*.so"))
    if found:
        return found, {}
    from kbit._elf import read_elf
    from kbit._native import _SIGNATURES

    usable, left_out = [], {}
    for lib in sorted(STAGE.glob("libkbit_cuda*.so")):
        missing = sorted(set(_SIGNATURES) - set(read_elf(lib).exported_functions))
        if missing:
            left_out[lib.name] = (f"{lib} predates the runtime (lacks {', '.join(missing)}): "
                                  "rebuild it with `nox -s build`")
        else:
            usable.append(lib)
    return usable, left_out


def copy_package(source: Path, dest: Path, libraries: list[Path]) -> None:
    """A copy of the kbit package in `dest`: its Python files, the CPU library and kbit.h (the ABI
    table) from `source`, the given CUDA libraries, and a manifest the build's writer makes for them
    (with build/stage's build records where the libraries came from there)."""
    dest.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix in (".py", ".typed") or f.name in ("libkbit_cpu.so", "kbit.h"):
            shutil.copy2(f, dest / f.name)
    for lib in libraries:
        shutil.copy2(lib, dest / lib.name)
    cmd = [sys.executable, "-m", "ci.write_manifest", str(dest), "0.1.0"]
    if libraries and any(STAGE.glob("libkbit_cuda*.json")):
        cmd.append(str(STAGE))
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
