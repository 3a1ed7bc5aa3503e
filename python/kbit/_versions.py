"""CUDA versions as typed values, and the one function that names a CUDA library.

Shared by the runtime (which looks for the files) and the build (which writes them); it imports
nothing beyond the standard library so build tooling can use it without installing kbit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CudaVersion", "cpu_library_name", "cuda_library_name", "parse_library_name"]

_LIB_RE = re.compile(r"^libkbit_cuda(\d+)(\d)\.so$")


@dataclass(frozen=True, order=True)
class CudaVersion:
    """A CUDA toolkit or driver version, MAJOR.MINOR."""

    major: int
    minor: int

    def __post_init__(self) -> None:
        if not (0 < self.major < 100 and 0 <= self.minor < 10):
            raise ValueError(f"not a CUDA version: {self.major}.{self.minor}")

    @classmethod
    def parse(cls, text: str) -> CudaVersion:
        """Accept "12.4", "12.4.1", "124" and "cu124"."""
        s = text.strip().lower().removeprefix("cu")
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", s)
        if m:
            return cls(int(m.group(1)), int(m.group(2)))
        if re.fullmatch(r"\d{3}", s):  # 118, 124, 130: two-digit major, one-digit minor
            return cls(int(s[:2]), int(s[2]))
        raise ValueError(f"not a CUDA version: {text!r} (expected e.g. '12.4' or '124')")

    @classmethod
    def from_int(cls, value: int) -> CudaVersion:
        """From the integer the driver and runtime APIs report (12040 -> 12.4)."""
        return cls(value // 1000, (value % 1000) // 10)

    @property
    def tag(self) -> str:
        """"124" for 12.4: the suffix of library names and wheel tags."""
        return f"{self.major}{self.minor}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def cuda_library_name(version: CudaVersion) -> str:
    return f"libkbit_cuda{version.tag}.so"


def cpu_library_name() -> str:
    return "libkbit_cpu.so"


def parse_library_name(name: str) -> CudaVersion | None:
    """The CUDA version of a libkbit_cudaXY.so name, or None for anything else."""
    m = _LIB_RE.match(name)
    return CudaVersion(int(m.group(1)), int(m.group(2))) if m else None
