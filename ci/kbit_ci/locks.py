"""The hash locks and the cache: where the tooling reads pinned files and keeps what it fetched.

A leaf module (it imports no provider, image or build module), so every one of those can use it:

    cache_dir(env)               KBIT_CACHE_DIR, else <repo>/.cache
    locked_requirements(lock)    {name: version} of a hash-locked requirements file
    render_lock(row, digests)    the text of a row's lock: its pins, each with its files' sha256 (pure)
    pypi_lock(row)               the row's lock ci/requirements/cudaXY.txt, checked against the matrix
    lock_mismatches(rows)        every PyPI row whose lock is missing or disagrees with its pins

A lock is generated (`python -m ci.lock_pypi` renders it from the matrix and the index's digests)
and checked: its versions must be the row's pins and its text exactly what render_lock makes of them
and its own digests, so a hand edit, a dropped package or a pin bumped in one place fails the build
and `nox -s lint`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from . import REPO
from .errors import ToolkitUnavailable
from .matrix import Row

__all__ = ["LOCKS_DIR", "cache_dir", "lock_mismatches", "locked_digests", "locked_requirements", "pypi_lock",
           "pypi_lock_path", "render_lock"]

LOCKS_DIR = REPO / "ci" / "requirements"


def cache_dir(env: Mapping[str, str], repo: Path = REPO) -> Path:
    """KBIT_CACHE_DIR, else <repo>/.cache (gitignored)."""
    return Path(env["KBIT_CACHE_DIR"]) if env.get("KBIT_CACHE_DIR") else repo / ".cache"


def locked_requirements(lock: Path) -> dict[str, str]:
    """{name: version} of a hash-locked requirements file (every pin must carry a --hash)."""
    text = lock.read_text()
    out: dict[str, str] = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", entry)
        if not m:
            raise ValueError(f"{lock}: not an exact pin with --hash=sha256: {entry!r}")
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def locked_digests(lock: Path) -> dict[str, list[str]]:
    """{name: [sha256, ...]} of a hash-locked requirements file."""
    out: dict[str, list[str]] = {}
    for entry in re.sub(r"\\\n", " ", lock.read_text()).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if entry:
            name = entry.split("==", 1)[0].lower().replace("_", "-")
            out[name] = re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)
    return out


def render_lock(row: Row, digests: Mapping[str, Sequence[str]]) -> str:
    """The lock of a PyPI row: a header, then each pin of the row (sorted) with its files' sha256."""
    assert row.pypi is not None
    lines = [f"# CUDA {row.cuda} from NVIDIA's PyPI wheels: the toolkit of the {row.cuda} row (ci/matrix.toml "
             "[row.pypi]).",
             "# Written by ci/lock_pypi.py from the index's sha256 of each pinned x86-64 wheel; pip enforces",
             "# it (--require-hashes) in the build image (docker/pypi.Dockerfile) and the host toolkit venv",
             "# (ci/kbit_ci/toolkits.py). The versions must equal the row's pins (the build checks)."]
    for name, version in sorted(_pins(row).items()):
        if not digests.get(name):
            raise ValueError(f"CUDA {row.cuda}: no sha256 for {name}=={version}")
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{d}" + (" \\" if i < len(digests[name]) - 1 else "")
                  for i, d in enumerate(digests[name])]
    return "\n".join(lines) + "\n"


def pypi_lock_path(row: Row, repo: Path = REPO) -> Path:
    """ci/requirements/cudaXY.txt: where the row's hash lock lives (whether or not it exists)."""
    return repo / "ci" / "requirements" / f"cuda{row.tag}.txt"


def _pins(row: Row) -> dict[str, str]:
    assert row.pypi is not None
    return {name.lower().replace("_", "-"): version for name, version in row.pypi.packages.items()}


def _mismatch(row: Row, lock: Path) -> str | None:
    """Why `lock` is not the lock of the row's pins, or None when it is."""
    if not lock.is_file():
        return f"CUDA {row.cuda}: no hash lock {lock} for its PyPI pins"
    try:
        locked = locked_requirements(lock)
    except ValueError as e:
        return f"CUDA {row.cuda}: {e}"
    pinned = _pins(row)
    fix = f"regenerate it (python -m ci.lock_pypi --cuda {row.cuda})"
    if locked != pinned:
        return f"CUDA {row.cuda}: {lock.name} locks {locked}, ci/matrix.toml pins {pinned}: {fix}"
    if lock.read_text() != render_lock(row, locked_digests(lock)):
        return f"CUDA {row.cuda}: {lock.name} is not the text `python -m ci.lock_pypi` writes (edited by hand?): {fix}"
    return None


def pypi_lock(row: Row, repo: Path = REPO) -> Path:
    """The row's hash lock, ci/requirements/cudaXY.txt, checked against the row's pins.

    The matrix says which versions; the lock adds each file's sha256, which pip enforces. A lock that
    disagrees with the matrix (a pin bumped in one place only) is an error, not a silent choice."""
    if row.pypi is None:
        raise ToolkitUnavailable(f"CUDA {row.cuda}: the row has no [row.pypi] pins")
    lock = pypi_lock_path(row, repo)
    why = _mismatch(row, lock)
    if why is not None:
        raise ToolkitUnavailable(why)
    return lock


def lock_mismatches(rows: Iterable[Row], repo: Path = REPO) -> list[str]:
    """One line per PyPI row whose lock is missing or locks other versions than the matrix pins, and
    per lock file no PyPI row owns (a row dropped from the matrix, its lock left behind)."""
    rows = list(rows)
    bad = [why for row in rows if row.pypi is not None and (why := _mismatch(row, pypi_lock_path(row, repo)))]
    owned = {pypi_lock_path(row, repo).name for row in rows if row.pypi is not None}
    for lock in sorted((repo / "ci" / "requirements").glob("cuda*.txt")):
        if lock.name not in owned:
            bad.append(f"{lock.name}: no PyPI row of ci/matrix.toml owns it (delete it, or add the row's [row.pypi])")
    return bad
