"""`python -m kbit verify`: every bundled library against the manifest, without loading any of them.

Per library: the file exists with the manifest's size and sha256; its exported `kbit_*` functions are
exactly the ones the runtime binds (`_native._SIGNATURES`); its cubin and PTX archs (read from the
ELF's fatbin by `_elf`) are the manifest's. A `libkbit_*.so` in the package that the manifest does
not list is a problem too. Nothing is dlopened, so a library for another CUDA version, or one that is
corrupt, is checked just as safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._elf import ElfError, file_sha256, read_elf
from ._probes import LibraryEntry, probe_manifest

__all__ = ["LibraryCheck", "verify"]


@dataclass(frozen=True)
class LibraryCheck:
    file: str
    problems: tuple[str, ...]
    summary: str = ""
    """What was checked, for an ok line."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"ok     {self.file:<22} {self.summary}"
        return f"FAILED {self.file:<22} {'; '.join(self.problems)}"



def _names(names: set[str]) -> str:
    return ", ".join(sorted(names))


def _check(package_dir: Path, entry: LibraryEntry, abi: frozenset[str]) -> LibraryCheck:
    path = package_dir / entry.file
    if not path.is_file():
        return LibraryCheck(entry.file, (f"missing from {package_dir}",))
    problems = []
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        problems.append(f"{size} bytes, the manifest says {entry.size}")
    if entry.sha256:
        digest = file_sha256(path)
        if digest != entry.sha256:
            problems.append(f"sha256 {digest[:12]}…, the manifest says {entry.sha256[:12]}…")
    else:
        problems.append("the manifest records no sha256")
    try:
        info = read_elf(path)
    except (ElfError, OSError) as e:
        return LibraryCheck(entry.file, (*problems, f"not a readable ELF library ({e})"))
    exported = {name for name in info.exported_functions if name.startswith("kbit_")}
    if exported - abi:
        problems.append(f"exports {_names(exported - abi)}, which the runtime does not bind")
    if abi - exported:
        problems.append(f"lacks {_names(abi - exported)}, which the runtime binds")
    for what, got, want in (("cubin", info.fatbin.cubin, entry.archs), ("PTX", info.fatbin.ptx, entry.ptx)):
        if set(got) != set(want):
            problems.append(f"{what} archs {','.join(got) or '-'}, the manifest says {','.join(want) or '-'}")
    archs = f"cubin {','.join(entry.archs) or '-'} ptx {','.join(entry.ptx) or '-'}"
    return LibraryCheck(entry.file, tuple(problems), f"sha256, {len(exported)} ABI symbols, {archs}")


def verify(package_dir: Path, abi: frozenset[str]) -> tuple[LibraryCheck, ...]:
    """One check per library the manifest lists, plus one per unlisted libkbit_*.so; a bad manifest
    is one failed check named after the manifest."""
    manifest = probe_manifest(package_dir)
    if not manifest.ok:
        return (LibraryCheck("manifest.json", (str(manifest.error),)),)
    checks = [_check(package_dir, e, abi) for e in manifest.libraries]
    listed = {e.file for e in manifest.libraries}
    checks += [LibraryCheck(p.name, ("not listed in the manifest",))
               for p in sorted(package_dir.glob("libkbit_*.so")) if p.name not in listed]
    return tuple(checks)
