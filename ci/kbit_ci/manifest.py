"""The package manifest: what each bundled library really carries, read back from the built files.

The archs and PTX come from the library's `.nv_fatbin` section, the compiler from its own
`kbit_build_info()`; the matrix is never copied in. The toolkit a library was built with comes from
the build record `nox -s build` writes beside each staged library (`libkbit_cuda124.json`); a
library built from source by CMake has none and is recorded as a local build.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

from kbit._elf import file_sha256, read_elf
from kbit._manifest import MANIFEST_SCHEMA  # the reader's number: one constant for writer and reader
from kbit._versions import parse_library_name

__all__ = ["MANIFEST_SCHEMA", "build_info", "library_entry", "write_manifest"]


def build_info(path: Path) -> dict[str, Any]:
    """The library's own kbit_build_info(). Loading needs no GPU: the CUDA runtime is static and
    only opens libcuda.so.1 on the first CUDA call."""
    lib = ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_LOCAL", 0))
    lib.kbit_build_info.restype = ctypes.c_char_p
    lib.kbit_build_info.argtypes = []
    return json.loads(lib.kbit_build_info().decode())


def library_entry(path: Path, record: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest entry of one built library. `record` is its build record, if any."""
    elf = read_elf(path)
    info = build_info(path)
    cuda = parse_library_name(path.name)
    backend = "cpu" if cuda is None else "cuda"
    if info.get("backend") != backend:
        raise ValueError(f"{path.name}: kbit_build_info() says backend {info.get('backend')!r}")
    toolkit = None
    if cuda is not None:
        toolkit = (record or {}).get("toolkit") or {"source": "local", "version": info.get("cuda")}
    return {
        "file": path.name,
        "backend": backend,
        "cuda": None if cuda is None else str(cuda),
        "archs": list(elf.fatbin.cubin),
        "ptx": list(elf.fatbin.ptx),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "toolkit": toolkit,
        "compiler": info.get("compiler"),
        "host_compiler": info.get("host_compiler"),
        "revision": info.get("revision"),
        "abi": info.get("abi"),
    }


def write_manifest(package_dir: Path, version: str, records_dir: Path | None = None, note: str = "") -> dict[str, Any]:
    """Write package_dir/manifest.json for every libkbit_*.so in package_dir (with `note`, a line the
    runtime shows, when given)."""
    libraries = sorted(package_dir.glob("libkbit_*.so"), key=lambda p: (p.name != "libkbit_cpu.so", p.name))
    entries = []
    for lib in libraries:
        record = None
        if records_dir is not None:
            rec_path = records_dir / (lib.stem + ".json")
            if rec_path.is_file():
                record = json.loads(rec_path.read_text())
        entries.append(library_entry(lib, record))
    abis = {e["abi"] for e in entries}
    if len(abis) > 1:
        raise ValueError(f"bundled libraries disagree on the ABI version: {sorted(abis)}")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kbit_version": version,
        "abi": abis.pop() if abis else None,
        "libraries": entries,
        **({"note": note} if note else {}),
    }
    (package_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
