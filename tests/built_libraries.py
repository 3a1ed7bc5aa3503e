"""The real CUDA libraries a test can use: the installed package's, else (a dev layout, which has only
the CPU library) the ones `nox -s build` staged in build/stage/.

The package's own libraries are taken as they are: one that lacks a symbol the runtime binds is a
broken package, and the test using it fails. A staged library is a convenience of the dev layout and
may predate the runtime (built before new kernels were bound): such a library is left out, with the
reason, so a test skips the cases that need it and says which library to rebuild.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STAGE", "cuda_libraries"]

STAGE = Path(__file__).resolve().parents[1] / "build" / "stage"


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
