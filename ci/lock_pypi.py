"""Write the hash locks ci/requirements/cudaXY.txt of the matrix rows whose toolkit comes from NVIDIA's
PyPI wheels ([row.pypi] in ci/matrix.toml), from the index's own sha256 of each pinned wheel.

    python -m ci.lock_pypi                 every PyPI row
    python -m ci.lock_pypi --cuda 13.2     one row (repeatable)
    python -m ci.lock_pypi --check         fail unless every PyPI row has a lock of exactly its pins and
                                           every lock a row (no network; `nox -s lint` runs it)

The lock is what `pip --require-hashes` enforces in the build image and the host toolkit venv; the
build refuses a lock whose versions are not the row's pins (kbit_ci.locks.pypi_lock).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

from .kbit_ci.locks import lock_mismatches, pypi_lock_path, render_lock
from .kbit_ci.matrix import Row, load_matrix, select_rows

INDEX = "https://pypi.org/pypi/{name}/json"
PLATFORM = "manylinux"  # and x86_64: the build images and hosts are x86-64 Linux


def _wheel_digest(name: str, version: str) -> tuple[str, str]:
    """(filename, sha256) of the x86-64 manylinux wheel of name==version, from the index's JSON."""
    with urllib.request.urlopen(INDEX.format(name=name), timeout=60) as r:
        data = json.load(r)
    files = [f for f in data["releases"].get(version, [])
             if f["filename"].endswith(".whl") and PLATFORM in f["filename"] and "x86_64" in f["filename"]]
    if len(files) != 1:
        raise SystemExit(f"{name}=={version}: {len(files)} x86-64 manylinux wheels on the index, expected one")
    return files[0]["filename"], files[0]["digests"]["sha256"]


def lock_text(row: Row) -> str:
    assert row.pypi is not None
    digests = {name.lower(): [_wheel_digest(name, version)[1]] for name, version in row.pypi.packages.items()}
    return render_lock(row, digests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ci.lock_pypi", description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="append", default=[], metavar="X.Y")
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    rows = load_matrix()
    if a.check:
        bad = lock_mismatches(rows)
        for b in bad:
            print(b, file=sys.stderr)
        return 1 if bad else 0
    for row in select_rows(rows, a.cuda):
        if row.pypi is None:
            continue
        lock = pypi_lock_path(row)
        lock.write_text(lock_text(row))
        print(f"wrote {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
