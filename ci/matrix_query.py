"""Answer questions about ci/matrix.toml from CMake and shell scripts, through the matrix loader.

    python -m ci.matrix_query --cmake-archs 12.4     ->  70-real;75-real;...;90-real;90-virtual

Exit status 2, with a message on stderr, when the version is not one or has no row. CMakeLists.txt
runs it (from the source directory, PYTHONPATH=python) when KBIT_CUDA_ARCHS is not given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .kbit_ci.matrix import MATRIX_FILE, MatrixError, load_matrix, select_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ci.matrix_query", description=__doc__.splitlines()[0])
    p.add_argument("--cmake-archs", metavar="X.Y", required=True, help="CMAKE_CUDA_ARCHITECTURES of the row")
    p.add_argument("--matrix", type=Path, default=MATRIX_FILE)
    a = p.parse_args(argv)
    try:
        (row,) = select_rows(load_matrix(a.matrix), [a.cmake_archs])
    except (MatrixError, ValueError) as e:
        print(f"matrix_query: {e}", file=sys.stderr)
        return 2
    print(row.cmake_archs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
