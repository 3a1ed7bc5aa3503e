"""Build tooling for kbit: the matrix, toolkit providers, containers, library builds, the manifest.

Used by the entry points in ci/ (`python -m ci.build`, `python -m ci.workflow`, ...) and the tests;
not part of the installed package. It shares the runtime's stdlib-only helpers (kbit._versions,
kbit._elf): `kbit` must be importable, installed or by configuration (PYTHONPATH=python: the
noxfile, CMakeLists.txt and tests/dev_layout.sh set it; kbit_ci never edits sys.path).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    import kbit._versions  # noqa: F401  (the first of the helpers every module here uses)
except ModuleNotFoundError as e:
    if e.name not in ("kbit", "kbit._versions"):
        raise
    raise ModuleNotFoundError(
        "the build tooling needs kbit's stdlib helpers (python/kbit/): run it from the repository root "
        "with PYTHONPATH=python (python -m ci.<tool>), or with kbit installed", name=e.name) from e
