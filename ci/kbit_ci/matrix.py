"""The CUDA build matrix (ci/matrix.toml) as frozen, validated data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import tomllib
from kbit._drivers import MINOR_COMPAT_FLOOR
from kbit._versions import CudaVersion, cuda_library_name

from . import REPO

__all__ = ["MATRIX_FILE", "DebianSource", "PypiSource", "Row", "load_matrix", "select_rows", "with_extra_archs"]

MATRIX_FILE = REPO / "ci" / "matrix.toml"


class MatrixError(ValueError):
    """ci/matrix.toml says something impossible."""


@dataclass(frozen=True)
class DebianSource:
    """The toolkit from Debian's non-free archive."""

    suite: str
    base_image: str
    gxx: str
    packages: Mapping[str, str]
    extra_suite: str | None = None  # e.g. "experimental", taken with apt's -t

    @property
    def toolkit_version(self) -> str:
        return self.packages["nvidia-cuda-toolkit"]


@dataclass(frozen=True)
class PypiSource:
    """The toolkit from NVIDIA's PyPI wheels."""

    base_image: str
    packages: Mapping[str, str]

    @property
    def toolkit_version(self) -> str:
        return self.packages["nvidia-cuda-nvcc"]

    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in sorted(self.packages.items())]


@dataclass(frozen=True)
class Row:
    cuda: CudaVersion
    archs: tuple[str, ...]
    ptx: str
    gcc: tuple[int, int]
    dockerfile: str
    nvidia_image: str | None = None
    debian: DebianSource | None = None
    pypi: PypiSource | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.cuda.tag

    @property
    def id(self) -> str:
        """Readable id for sessions, jobs and tests: "cu124"."""
        return f"cu{self.cuda.tag}"

    @property
    def library(self) -> str:
        return cuda_library_name(self.cuda)

    @property
    def image(self) -> str:
        """The local build image of this row."""
        return f"kbit-build:{self.id}"

    @property
    def cmake_archs(self) -> str:
        """CMAKE_CUDA_ARCHITECTURES: a cubin per arch plus PTX for the top one."""
        return ";".join([f"{a}-real" for a in self.archs] + [f"{self.ptx}-virtual"])


def _arch_key(arch: str) -> tuple[int, str]:
    digits = arch.rstrip("abf")
    return int(digits), arch[len(digits):]


def _row(raw: dict, where: str) -> Row:
    try:
        cuda = CudaVersion.parse(raw["cuda"])
        for key in ("archs", "gcc"):
            if not isinstance(raw[key], list):
                raise TypeError(f"{key} must be a list, got {raw[key]!r}")
        archs = tuple(str(a) for a in raw["archs"])
        ptx = str(raw["ptx"])
        gcc = tuple(int(x) for x in raw["gcc"])
        dockerfile = str(raw["dockerfile"])
    except (KeyError, TypeError, ValueError) as e:
        raise MatrixError(f"{where}: {e!r}") from None
    odd = [a for a in (*archs, ptx) if not re.fullmatch(r"\d{2,3}[af]?", a)]
    if odd:
        raise MatrixError(f"{where}: an arch is written like 90, 90a or 100f, not {', '.join(map(repr, odd))}")
    if list(archs) != sorted(archs, key=_arch_key) or len(set(archs)) != len(archs):
        raise MatrixError(f"{where}: archs must be unique and ascending: {archs}")
    if _arch_key(ptx) < _arch_key(archs[-1]):
        raise MatrixError(f"{where}: ptx {ptx} is below the top arch {archs[-1]}")
    if cuda.major not in MINOR_COMPAT_FLOOR:
        raise MatrixError(f"{where}: CUDA {cuda.major}.x has no minor-version compatibility floor in "
                          "python/kbit/_drivers.py (MINOR_COMPAT_FLOOR): add the major's first driver branch there")
    if len(gcc) != 2 or gcc[0] > gcc[1]:
        raise MatrixError(f"{where}: gcc must be [min, max]: {gcc}")
    if not (REPO / dockerfile).is_file():
        raise MatrixError(f"{where}: no such dockerfile {dockerfile}")
    debian = pypi = None
    if "debian" in raw:
        d = raw["debian"]
        debian = DebianSource(
            suite=d["suite"],
            base_image=d["base_image"],
            gxx=d["gxx"],
            packages=MappingProxyType(dict(d["packages"])),
            extra_suite=d.get("extra_suite"),
        )
    if "pypi" in raw:
        p = raw["pypi"]
        pypi = PypiSource(base_image=p["base_image"], packages=MappingProxyType(dict(p["packages"])))
    if debian is None and pypi is None and not raw.get("nvidia_image"):
        raise MatrixError(f"{where}: no toolkit source (debian, pypi or nvidia_image)")
    return Row(
        cuda=cuda,
        archs=archs,
        ptx=ptx,
        gcc=(gcc[0], gcc[1]),
        dockerfile=dockerfile,
        nvidia_image=raw.get("nvidia_image"),
        debian=debian,
        pypi=pypi,
    )


def load_matrix(path: Path = MATRIX_FILE) -> tuple[Row, ...]:
    """Every row of the matrix, ascending by CUDA version."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    if raw.get("schema") != 1:
        raise MatrixError(f"{path}: unknown schema {raw.get('schema')!r}")
    rows = tuple(_row(r, f"{path.name} row {i}") for i, r in enumerate(raw.get("row", [])))
    if not rows:
        raise MatrixError(f"{path}: no [[row]]")
    versions = [r.cuda for r in rows]
    if versions != sorted(set(versions)):
        raise MatrixError(f"{path}: rows must be unique and ascending by cuda: {', '.join(map(str, versions))}")
    return rows


def select_rows(rows: tuple[Row, ...], wanted: list[str]) -> tuple[Row, ...]:
    """The rows named by `wanted` ("12.4", "124", "cu124"); all rows when empty."""
    if not wanted:
        return rows
    by_version = {r.cuda: r for r in rows}
    out = []
    for w in wanted:
        v = CudaVersion.parse(w)
        if v not in by_version:
            known = ", ".join(str(r.cuda) for r in rows)
            raise MatrixError(f"CUDA {v} is not in ci/matrix.toml (rows: {known})")
        out.append(by_version[v])
    return tuple(out)


def with_extra_archs(rows: tuple[Row, ...], extra: list[str]) -> tuple[Row, ...]:
    """The rows with cubins for `extra` archs too ("61", "sm_61"), for GPUs no row covers.

    The PTX arch stays the row's top arch; an arch the row's nvcc cannot compile fails the build with
    nvcc's own message.
    """
    if not extra:
        return rows
    wanted = set()
    for arch in extra:
        a = arch.strip().lower().removeprefix("sm_")
        if not a.isdigit() or len(a) < 2:
            raise MatrixError(f"--arch {arch!r}: expected a compute capability like 61 or sm_61")
        wanted.add(a)
    out = []
    for row in rows:
        archs = tuple(sorted(set(row.archs) | wanted, key=_arch_key))
        out.append(replace(row, archs=archs))
    return tuple(out)
