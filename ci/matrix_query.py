"""Answer questions about ci/matrix.toml from CMake and shell scripts (standard library only).

    python -m ci.matrix_query --cmake-archs 12.4     ->  70-real;75-real;...;90-real;90-virtual

Exit status 2, with a message on stderr, when the version has no row.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

MATRIX = Path(__file__).resolve().parent / "matrix.toml"


def _major_minor(text: str) -> tuple[int, int] | None:
    s = text.strip().lower().removeprefix("cu")
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", s)
    if m:
        return int(m.group(1)), int(m.group(2))
    if re.fullmatch(r"\d{3}", s):
        return int(s[:2]), int(s[2])
    return None


def cmake_archs(row: dict) -> str:
    """Same rule as kbit_ci.matrix.Row.cmake_archs: a cubin per arch, PTX for the top one."""
    return ";".join([f"{a}-real" for a in row["archs"]] + [f"{row['ptx']}-virtual"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cmake-archs", metavar="X.Y", required=True, help="CMAKE_CUDA_ARCHITECTURES of the row")
    p.add_argument("--matrix", type=Path, default=MATRIX)
    a = p.parse_args(argv)
    want = _major_minor(a.cmake_archs)
    if want is None:
        print(f"matrix_query: not a CUDA version: {a.cmake_archs!r}", file=sys.stderr)
        return 2
    with open(a.matrix, "rb") as f:
        rows = tomllib.load(f).get("row", [])
    for row in rows:
        if _major_minor(row["cuda"]) == want:
            print(cmake_archs(row))
            return 0
    known = ", ".join(r["cuda"] for r in rows)
    print(f"matrix_query: CUDA {want[0]}.{want[1]} has no row in {a.matrix} (rows: {known})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
