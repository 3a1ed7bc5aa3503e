"""The container CLI: install the engine on a fresh Debian/Ubuntu machine, build the row images.

    python -m ci.containers --install-engine    # = apt-get update && apt-get install -y podman runc debootstrap
    python -m ci.containers --images 12.4 13.0  # the build images of these rows (all: none named)

The decisions live in kbit_ci.engine (which engine, its flags), kbit_ci.registry, kbit_ci.base_images
and kbit_ci.images; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import sys

from .kbit_ci import REPO, proc
from .kbit_ci.engine import ENGINE_PACKAGES, detect_engine, install_engine, install_engine_commands
from .kbit_ci.images import ensure_row_image
from .kbit_ci.matrix import load_matrix, select_rows

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ci.containers")
    p.add_argument("--install-engine", action="store_true", help="apt-get install " + " ".join(ENGINE_PACKAGES))
    p.add_argument("--print-install", action="store_true", help="print the install commands and exit")
    p.add_argument("--images", nargs="*", metavar="X.Y", help="build the build images of these rows (all: none given)")
    a = p.parse_args(argv)
    if a.print_install:
        for cmd in install_engine_commands():
            print(" ".join(cmd))
        return 0
    if a.install_engine:
        install_engine()
    engine, why = detect_engine()
    if engine is None:
        print(f"no container engine works: {why}", file=sys.stderr)
        return 1
    proc.log(f"engine: {engine.exe} {' '.join(engine.run_flags)}")
    if a.images is not None:
        for row in select_rows(load_matrix(), a.images):
            if row.debian is None and row.pypi is None and not a.images:
                continue
            ensure_row_image(engine, row, REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
