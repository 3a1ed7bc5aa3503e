"""Reading what a shared library carries, with the standard library only.

Used by the build (to write the manifest from the built files, not from the matrix), by the tests
and by `python -m kbit verify`. Only little-endian ELF64 is supported: that is every platform kbit
builds for.

CUDA code lives in the `.nv_fatbin` section as a sequence of fat binary containers. Each container
(magic 0xBA55ED50) holds entries that are either a cubin (machine code for one sm_XY) or PTX (for
one compute_XY, JIT-compiled by the driver on newer GPUs). The entry header gives the kind and the
architecture number.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ElfError", "ElfInfo", "FatbinArchs", "check_loadable", "fatbin_archs", "file_sha256", "load_problem",
           "read_elf"]

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KIND_PTX = 1
_FATBIN_KIND_CUBIN = 2
_SHT_DYNSYM = 11
_SHT_DYNAMIC = 6
_SHT_GNU_VERNEED = 0x6FFFFFFE
_DT_NEEDED = 1
_DT_SONAME = 14
_STB_GLOBAL = 1
_STB_WEAK = 2
_STT_FUNC = 2
_STV_DEFAULT = 0
_SHN_UNDEF = 0


class ElfError(ValueError):
    """The file is not an ELF64 little-endian shared object this reader understands."""


@dataclass(frozen=True)
class FatbinArchs:
    cubin: tuple[str, ...]  # "70", "90", ... ascending, unique
    ptx: tuple[str, ...]


@dataclass(frozen=True)
class ElfInfo:
    soname: str | None
    needed: tuple[str, ...]
    exported_functions: tuple[str, ...]  # defined, global/weak, default visibility, sorted
    sections: tuple[str, ...]
    fatbin: FatbinArchs
    # .gnu.version_r: the symbol versions required of each needed library, e.g.
    # {"libc.so.6": ("GLIBC_2.2.5", "GLIBC_2.17")}; what the dynamic loader checks before loading.
    version_needs: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _arch_sort_key(arch: str) -> tuple[int, str]:
    digits = "".join(ch for ch in arch if ch.isdigit())
    return int(digits or 0), arch


def _cstr(blob: bytes, offset: int) -> str:
    end = blob.index(b"\0", offset)
    return blob[offset:end].decode("utf-8", "replace")


def fatbin_archs(section: bytes) -> FatbinArchs:
    """The cubin and PTX architectures of every fat binary container in a `.nv_fatbin` section."""
    cubin: set[str] = set()
    ptx: set[str] = set()
    off = 0
    while off + 16 <= len(section):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, off)
        if magic != _FATBIN_MAGIC:
            # Containers are 8-byte aligned; skip padding between them.
            off += 8
            continue
        entry = off + header_size
        end = min(entry + fat_size, len(section))
        while entry + 32 <= end:
            kind, _u1, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            if entry_header == 0:
                raise ElfError(f"corrupt fat binary entry at offset {entry:#x}")
            if kind == _FATBIN_KIND_CUBIN:
                cubin.add(str(arch))
            elif kind == _FATBIN_KIND_PTX:
                ptx.add(str(arch))
            entry += entry_header + payload
        off = end
    return FatbinArchs(
        cubin=tuple(sorted(cubin, key=_arch_sort_key)), ptx=tuple(sorted(ptx, key=_arch_sort_key))
    )


def _version_needs(blob: bytes, strtab: bytes, count: int) -> dict[str, tuple[str, ...]]:
    """Parse Elf64_Verneed records (file, then a chain of Elf64_Vernaux version names)."""
    needs: dict[str, list[str]] = {}
    off = 0
    for _ in range(count or 1 << 16):
        if off + 16 > len(blob):
            break
        vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", blob, off)
        if vn_version != 1:
            raise ElfError(f"unknown Verneed version {vn_version}")
        names = needs.setdefault(_cstr(strtab, vn_file), [])
        aux = off + vn_aux
        for _ in range(vn_cnt):
            _hash, _flags, _other, vna_name, vna_next = struct.unpack_from("<IHHII", blob, aux)
            names.append(_cstr(strtab, vna_name))
            if vna_next == 0:
                break
            aux += vna_next
        if vn_next == 0:
            break
        off += vn_next
    return {file: tuple(sorted(set(v), key=_version_key)) for file, v in needs.items()}


def _version_key(version: str) -> tuple[str, tuple[int, ...]]:
    family, _, number = version.partition("_")
    return family, tuple(int(x) for x in number.split(".") if x.isdigit())


_PT_LOAD = 1


def load_problem(head: bytes, size: int) -> str | None:
    """Why the dynamic loader must not map this file (None: it may): `head` is the file's first bytes
    (at least its program headers), `size` its length. A truncated library would be mapped past its
    end, and the first touch of a missing page kills the process with SIGBUS: dlopen must not see it."""
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return "not an ELF file"
    if head[4] != 2 or head[5] != 1:
        return "not a little-endian 64-bit ELF file"
    (e_type,) = struct.unpack_from("<H", head, 0x10)
    if e_type != 3:  # ET_DYN
        return "not a shared library"
    (e_phoff,) = struct.unpack_from("<Q", head, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
    if e_phentsize != 56 or e_phnum == 0 or e_phoff + e_phnum * 56 > min(size, len(head)):
        return f"its program headers lie outside its {size} bytes (truncated?)"
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", head, e_phoff + i * 56)
        if p_type == _PT_LOAD and p_offset + p_filesz > size:
            return f"a loadable segment ends at byte {p_offset + p_filesz}, the file has {size} (truncated?)"
    return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_loadable(path: str | Path) -> None:
    """Raises ElfError saying why `path` must not be dlopen'ed (see load_problem)."""
    p = Path(path)
    with p.open("rb") as f:
        size = p.stat().st_size
        head = f.read(65536)
    problem = load_problem(head, size)
    if problem:
        raise ElfError(f"{path}: {problem}")


def read_elf(path: str | Path) -> ElfInfo:
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path}: only little-endian ELF64 is supported")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if e_shoff == 0 or e_shentsize != 64:
        raise ElfError(f"{path}: no section headers")

    sections = []
    for i in range(e_shnum):
        name, stype, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize
        )
        sections.append((name, stype, offset, size, link, entsize))
    shstr = sections[e_shstrndx]
    names = [_cstr(data, shstr[2] + s[0]) for s in sections]

    def body(i: int) -> bytes:
        _n, stype, offset, size, _l, _e = sections[i]
        return b"" if stype == 8 else data[offset : offset + size]  # SHT_NOBITS has no bytes

    needed: list[str] = []
    soname = None
    exported: set[str] = set()
    fat_cubin: set[str] = set()
    fat_ptx: set[str] = set()
    version_needs: dict[str, tuple[str, ...]] = {}
    for i, (_n, stype, _off, _size, link, entsize) in enumerate(sections):
        if stype == _SHT_DYNAMIC:
            strtab = body(link)
            blob = body(i)
            for j in range(0, len(blob) - 15, 16):
                tag, val = struct.unpack_from("<qQ", blob, j)
                if tag == _DT_NEEDED:
                    needed.append(_cstr(strtab, val))
                elif tag == _DT_SONAME:
                    soname = _cstr(strtab, val)
        elif stype == _SHT_DYNSYM:
            strtab = body(link)
            blob = body(i)
            step = entsize or 24
            for j in range(0, len(blob) - step + 1, step):
                st_name, st_info, st_other, st_shndx = struct.unpack_from("<IBBH", blob, j)
                bind, typ, vis = st_info >> 4, st_info & 0xF, st_other & 0x3
                if (
                    st_shndx != _SHN_UNDEF
                    and bind in (_STB_GLOBAL, _STB_WEAK)
                    and typ == _STT_FUNC
                    and vis == _STV_DEFAULT
                ):
                    exported.add(_cstr(strtab, st_name))
        elif stype == _SHT_GNU_VERNEED:
            # sh_info holds the number of records
            (count,) = struct.unpack_from("<I", data, e_shoff + i * e_shentsize + 44)
            version_needs.update(_version_needs(body(i), body(link), count))
        elif names[i] == ".nv_fatbin":
            archs = fatbin_archs(body(i))
            fat_cubin.update(archs.cubin)
            fat_ptx.update(archs.ptx)
    return ElfInfo(
        soname=soname,
        needed=tuple(needed),
        exported_functions=tuple(sorted(exported)),
        sections=tuple(names),
        fatbin=FatbinArchs(
            cubin=tuple(sorted(fat_cubin, key=_arch_sort_key)),
            ptx=tuple(sorted(fat_ptx, key=_arch_sort_key)),
        ),
        version_needs=version_needs,
    )
