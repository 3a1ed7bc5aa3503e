"""Write the package manifest at wheel-install time (called by CMakeLists.txt's install step).

usage: python ci/write_manifest.py PACKAGE_DIR VERSION [RECORDS_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kbit_ci.manifest import write_manifest


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    records = Path(argv[2]) if len(argv) == 3 and argv[2] else None
    manifest = write_manifest(Path(argv[0]), argv[1], records)
    for e in manifest["libraries"]:
        archs = ",".join(e["archs"]) or "-"
        ptx = ",".join(e["ptx"]) or "-"
        print(f"[kbit] manifest: {e['file']:<22} cubin {archs:<32} ptx {ptx:<6} {e['size']:>10} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
