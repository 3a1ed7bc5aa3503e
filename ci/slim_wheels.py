"""Slim per-CUDA wheels, rewritten from the repaired fat wheel.

    python -m ci.slim_wheels dist/kbit-0.2.0-py3-none-manylinux_2_35_x86_64.whl dist/slim/
    # -> dist/slim/kbit-0.2.0+cu118-py3-none-manylinux_2_35_x86_64.whl, ...+cu124..., one per CUDA library

For each CUDA library in the fat wheel's manifest, writes
`kbit-0.2.0+cu124-py3-none-<plat>.whl`: the same runtime and CPU library, only libkbit_cuda124.so, a
manifest listing just those two, the version with a local part (`+cu124`) in METADATA, the dist-info
name and kbit/_version.py, and a RECORD with fresh hashes. Nothing is rebuilt: the libraries are the
fat wheel's bytes. The output is deterministic (entry order, timestamps and modes are the fat
wheel's), so the same fat wheel always gives byte-identical slim wheels.

PyPI refuses local versions: slim wheels go to a per-CUDA index or a release page, the fat wheel to PyPI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SlimWheelError", "slim_version", "slim_wheel", "slim_wheels"]

_WHEEL_NAME = re.compile(r"(?P<name>[^-]+)-(?P<version>[^-]+)-(?P<tags>[^-]+-[^-]+-[^-]+)\.whl")
_CUDA_LIB = re.compile(r"libkbit_cuda(\d+)\.so")


class SlimWheelError(ValueError):
    """The input is not a kbit fat wheel this tool understands."""


@dataclass(frozen=True)
class SlimWheel:
    path: Path
    cuda: str  # "12.4"
    library: str  # "libkbit_cuda124.so"
    version: str  # "0.2.0+cu124"


def slim_version(version: str, local: str) -> str:
    """"0.2.0" + "cu124" -> "0.2.0+cu124"; a version with a local part gets it appended ("+g1a2b.cu124")."""
    if not re.fullmatch(r"[a-z0-9]+", local):
        raise SlimWheelError(f"local version part {local!r}: lowercase letters and digits only")
    return f"{version}.{local}" if "+" in version else f"{version}+{local}"


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _rewrite_metadata(text: str, old: str, new: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line == "":  # end of the headers: the description follows
            break
        if line.startswith("Version: "):
            if line != f"Version: {old}":
                raise SlimWheelError(f"METADATA says {line!r}, the wheel's name says {old}")
            lines[i] = f"Version: {new}"
            return "\n".join(lines)
    raise SlimWheelError("METADATA has no Version header")


def slim_wheel(fat: Path, out_dir: Path, cuda_library: str) -> SlimWheel:
    """Write the slim wheel of `fat` that keeps only `cuda_library` of its CUDA libraries."""
    m = _WHEEL_NAME.fullmatch(fat.name)
    if not m:
        raise SlimWheelError(f"{fat.name}: not a wheel file name")
    lib = _CUDA_LIB.fullmatch(cuda_library)
    if not lib:
        raise SlimWheelError(f"{cuda_library!r} is not a libkbit_cudaXY.so name")
    name, version, tags = m["name"], m["version"], m["tags"]
    local = f"cu{lib.group(1)}"
    new_version = slim_version(version, local)
    old_info, new_info = f"{name}-{version}.dist-info", f"{name}-{new_version}.dist-info"

    with zipfile.ZipFile(fat) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if "kbit/manifest.json" not in names or f"{old_info}/RECORD" not in names:
            raise SlimWheelError(f"{fat.name}: no kbit/manifest.json or {old_info}/RECORD")
        manifest = json.loads(z.read("kbit/manifest.json"))
        files = {e["file"]: e for e in manifest["libraries"]}
        if cuda_library not in files:
            raise SlimWheelError(f"{fat.name} carries no {cuda_library} (it has {', '.join(sorted(files))})")
        keep = {f for f, e in files.items() if e["backend"] == "cpu"} | {cuda_library}
        drop = {f"kbit/{f}" for f in files} - {f"kbit/{f}" for f in keep}
        manifest["libraries"] = [e for e in manifest["libraries"] if e["file"] in keep]
        manifest["kbit_version"] = new_version
        cuda = files[cuda_library]["cuda"]

        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{name}-{new_version}-{tags}.whl"
        tmp = out.with_suffix(".whl.part")
        record_lines = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as w:
            for info in infos:
                if info.filename in drop or info.filename == f"{old_info}/RECORD":
                    continue
                data = z.read(info)
                target = info.filename
                if target.startswith(old_info + "/"):
                    target = new_info + target[len(old_info):]
                if info.filename == "kbit/manifest.json":
                    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
                elif info.filename == "kbit/_version.py":
                    text = data.decode()
                    if f'version = "{version}"' not in text:
                        raise SlimWheelError(f"kbit/_version.py does not say version {version}")
                    data = text.replace(f'version = "{version}"', f'version = "{new_version}"').encode()
                elif info.filename == f"{old_info}/METADATA":
                    data = _rewrite_metadata(data.decode(), version, new_version).encode()
                _write(w, info, target, data)
                if not info.is_dir():  # directory entries (auditwheel writes them) have no RECORD line
                    record_lines.append(f"{target},{_record_hash(data)},{len(data)}")
            record_lines.append(f"{new_info}/RECORD,,")
            record = ("\n".join(record_lines) + "\n").encode()
            _write(w, z.getinfo(f"{old_info}/RECORD"), f"{new_info}/RECORD", record)
        tmp.replace(out)
    return SlimWheel(path=out, cuda=cuda, library=cuda_library, version=new_version)


def _write(w: zipfile.ZipFile, like: zipfile.ZipInfo, name: str, data: bytes) -> None:
    """One entry, with the original's timestamp and mode: deterministic output."""
    info = zipfile.ZipInfo(name, date_time=like.date_time)
    info.external_attr = like.external_attr
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = like.create_system
    w.writestr(info, data)


def cuda_libraries(fat: Path) -> list[str]:
    """The CUDA libraries the fat wheel's manifest lists."""
    with zipfile.ZipFile(fat) as z:
        manifest = json.loads(z.read("kbit/manifest.json"))
    return [e["file"] for e in manifest["libraries"] if e["backend"] == "cuda"]


def slim_wheels(fat: Path, out_dir: Path, only: Iterable[str] = ()) -> list[SlimWheel]:
    """One slim wheel per CUDA library of `fat` (or per library in `only`); old kbit wheels in out_dir go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("kbit-*.whl"):
        old.unlink()
    return [slim_wheel(fat, out_dir, lib) for lib in (list(only) or cuda_libraries(fat))]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for s in slim_wheels(Path(argv[0]), Path(argv[1])):
        print(f"{s.path} (CUDA {s.cuda}, {s.path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
