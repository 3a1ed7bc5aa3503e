"""The package manifest (manifest.json): what each bundled library carries, as the runtime reads it.

The build writes it (ci/kbit_ci/manifest.py, with this module's MANIFEST_SCHEMA: one number for
writer and reader); `probe_manifest()` reads it without ever raising, the pure `parse_manifest()`
turns its text into a `Manifest` whose `error` says why a bad one is unusable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ._versions import CudaVersion

__all__ = ["MANIFEST_MAX_BYTES", "MANIFEST_NAME", "MANIFEST_SCHEMA", "LibraryEntry", "Manifest", "parse_manifest",
           "probe_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
MANIFEST_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class LibraryEntry:
    """One bundled native library, as the manifest describes it."""

    file: str
    backend: str
    """"cpu" or "cuda"."""
    cuda: Optional[CudaVersion]
    archs: tuple[str, ...]
    """Compute capabilities with a cubin, e.g. ("80", "86", "90a")."""
    ptx: tuple[str, ...]
    """Compute capabilities with PTX, e.g. ("90",)."""
    sha256: Optional[str] = None
    size: Optional[int] = None
    compiler: Optional[str] = None
    toolkit: Optional[str] = None
    """How the toolkit was obtained, one line (e.g. "12.4.131~12.4.1-2 from container:debian")."""


@dataclass(frozen=True)
class Manifest:
    path: str
    libraries: tuple[LibraryEntry, ...] = ()
    kbit_version: Optional[str] = None
    abi: Optional[int] = None
    error: Optional[str] = None
    """Why the manifest is unusable (missing, not JSON, wrong schema); None when it is fine."""
    note: Optional[str] = None
    """A line from the build for `python -m kbit` (a source build without a CUDA toolkit says how to get one)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def entry(self, file: str) -> Optional[LibraryEntry]:
        return next((e for e in self.libraries if e.file == file), None)

    @property
    def cuda_libraries(self) -> tuple[LibraryEntry, ...]:
        """The CUDA libraries, lowest CUDA version first."""
        libs = [e for e in self.libraries if e.backend == "cuda" and e.cuda is not None]
        return tuple(sorted(libs, key=lambda e: e.cuda))  # type: ignore[arg-type,return-value]


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _toolkit_line(toolkit: Any) -> Optional[str]:
    if not isinstance(toolkit, dict):
        return None
    version, source = toolkit.get("version"), toolkit.get("source")
    return " from ".join(str(x) for x in (version, source) if x) or None


def _entry(raw: Any, index: int) -> LibraryEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"libraries[{index}] is not an object")
    file, backend = raw.get("file"), raw.get("backend")
    if not isinstance(file, str) or "/" in file or not file:
        raise ValueError(f"libraries[{index}].file must be a file name, got {file!r}")
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"libraries[{index}].backend must be 'cpu' or 'cuda', got {backend!r}")
    cuda = raw.get("cuda")
    if backend == "cuda" and not isinstance(cuda, str):
        raise ValueError(f"libraries[{index}] ({file}) is a CUDA library without a 'cuda' version")
    size = raw.get("size")
    return LibraryEntry(
        file=file,
        backend=backend,
        cuda=CudaVersion.parse(cuda) if backend == "cuda" else None,
        archs=_str_tuple(raw.get("archs", []), f"libraries[{index}].archs"),
        ptx=_str_tuple(raw.get("ptx", []), f"libraries[{index}].ptx"),
        sha256=raw.get("sha256") if isinstance(raw.get("sha256"), str) else None,
        size=size if isinstance(size, int) else None,
        compiler=raw.get("compiler") if isinstance(raw.get("compiler"), str) else None,
        toolkit=_toolkit_line(raw.get("toolkit")),
    )


def parse_manifest(text: str, path: str = MANIFEST_NAME) -> Manifest:
    """Parse manifest.json's text. Pure: a bad manifest gives a Manifest whose `error` says why."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("the top level is not an object")
        if raw.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r} is not {MANIFEST_SCHEMA}: "
                             "this kbit runtime does not match the libraries it was installed with")
        libs = raw.get("libraries")
        if not isinstance(libs, list):
            raise ValueError("'libraries' is not a list")
        entries = tuple(_entry(e, i) for i, e in enumerate(libs))
        abi = raw.get("abi")
        note = raw.get("note")
        return Manifest(path, entries, raw.get("kbit_version"), abi if isinstance(abi, int) else None,
                        note=note[:500] if isinstance(note, str) and note else None)
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError; RecursionError: nesting
        return Manifest(path, error=f"{path} is corrupt ({type(e).__name__}: {str(e)[:200]}): reinstall kbit")


def probe_manifest(package_dir: Path) -> Manifest:
    path = package_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
        if len(raw) > MANIFEST_MAX_BYTES:
            return Manifest(str(path), error=f"{path} is corrupt ({len(raw)} bytes; a manifest is a few KB): "
                                             "reinstall kbit")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Manifest(str(path), error=f"{path} is corrupt (not UTF-8: {e}): reinstall kbit")
    except FileNotFoundError:
        return Manifest(str(path), error=f"{path} is missing: reinstall kbit (pip install --force-reinstall kbit), "
                                         "or in a source checkout build the libraries and write the manifest")
    except OSError as e:
        return Manifest(str(path), error=f"{path} cannot be read ({e})")
    return parse_manifest(text, str(path))
