"""Build tooling for kbit: the matrix, toolkit providers, containers, library builds, the wheel.

Imported by noxfile.py and the tests; not part of the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The runtime's stdlib-only helpers (CUDA versions, library names, ELF reading) are shared with the
# build, so the build can use them without kbit being installed. Appended, not prepended: where kbit
# is installed (the test session), the installed package is the one imported.
if str(REPO / "python") not in sys.path:
    sys.path.append(str(REPO / "python"))
