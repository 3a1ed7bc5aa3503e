"""Write the package manifest at wheel-install time (called by CMakeLists.txt's install step).

usage: python -m ci.write_manifest PACKAGE_DIR VERSION [RECORDS_DIR] [--note=TEXT]

VERSION is the wheel's full PEP 440 version (scikit-build-core's SKBUILD_PROJECT_VERSION_FULL, from the
git tag through setuptools-scm): the manifest's kbit_version must equal kbit.__version__. --note: a line
for `python -m kbit` (a source build without a CUDA toolkit says how to get one).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .kbit_ci.manifest import write_manifest

# PEP 440 (canonical forms): 1.2.3, 1.2.3rc1, 1.2.4.dev5, 1.2.3+cu124
_VERSION = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?")


def main(argv: list[str]) -> int:
    notes = [a.removeprefix("--note=") for a in argv if a.startswith("--note=")]
    argv = [a for a in argv if not a.startswith("--note=")]
    if len(argv) not in (2, 3) or len(notes) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    if not _VERSION.fullmatch(argv[1]):
        print(f"ci.write_manifest: {argv[1]!r} is not a PEP 440 version", file=sys.stderr)
        return 2
    records = Path(argv[2]) if len(argv) == 3 and argv[2] else None
    manifest = write_manifest(Path(argv[0]), argv[1], records, note=notes[0] if notes else "")
    for e in manifest["libraries"]:
        archs = ",".join(e["archs"]) or "-"
        ptx = ",".join(e["ptx"]) or "-"
        print(f"[kbit] manifest: {e['file']:<22} cubin {archs:<32} ptx {ptx:<6} {e['size']:>10} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
