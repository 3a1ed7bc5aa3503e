"""The C ABI as data, read from kbit.h: the one table of the native libraries' entry points.

kbit.h (csrc/include/kbit.h in the source tree, a copy beside this module in the installed package)
declares every exported function as one line-initial `KBIT_API <type> kbit_<name>(<params>);` and
the ABI's version as `#define KBIT_ABI_VERSION <n>`. `parse_header` reads both with the standard
library only, so the ctypes bindings (`_native`), `python -m kbit verify` and the tests all take
their signatures and the ABI version from the header the libraries were compiled against, and a
prototype is never restated. Functions declared to return `kbit_status` are the calls whose non-zero
result is an error; the others return a value (an int, or a static string).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["HEADER", "Abi", "AbiError", "Function", "load_abi", "parse_header"]

HEADER = Path(__file__).resolve().parent / "kbit.h"
"""The packaged copy of kbit.h (CMake installs it; tests/dev_layout.sh copies it for a source checkout)."""

# C type (whitespace normalized) -> ctypes type. Any other pointer is a c_void_p.
_SCALARS: Mapping[str, Any] = {
    "kbit_status": ctypes.c_int,
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "float": ctypes.c_float,
}
_STRING = "const char*"
_PROTOTYPE = re.compile(r"^KBIT_API\s+(?P<ret>[^;(){}]*?)\s*\b(?P<name>kbit_\w+)\s*\((?P<params>[^;(){}]*)\)\s*;",
                        re.M)
_VERSION = re.compile(r"^#define\s+KBIT_ABI_VERSION\s+(\d+)\s*$", re.M)
_PARAM = re.compile(r"^(?P<type>.*?[\w*])\s*\b(?P<name>[A-Za-z_]\w*)$")


class AbiError(ValueError):
    """kbit.h does not parse as the ABI table (what and where is in the message)."""


@dataclass(frozen=True)
class Function:
    """One KBIT_API prototype: C types as written (whitespace normalized), parameter names, ctypes."""

    name: str
    restype: str
    params: tuple[tuple[str, str], ...]
    """(C type, name) of each parameter."""

    @property
    def returns_status(self) -> bool:
        return self.restype == "kbit_status"

    @property
    def ctypes_restype(self) -> Any:
        return None if self.restype == "void" else _ctype(self.restype, f"{self.name}'s return type")

    @property
    def ctypes_argtypes(self) -> list[Any]:
        return [_ctype(t, f"{self.name}'s parameter {n}") for t, n in self.params]


@dataclass(frozen=True)
class Abi:
    version: int
    functions: Mapping[str, Function]

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over every function's C return and parameter types (not the names
        of parameters): it changes exactly when the table does, so tests can demand a version bump."""
        lines = (f"{f.restype} {f.name}({', '.join(t for t, _ in f.params)})"
                 for f in sorted(self.functions.values(), key=lambda f: f.name))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    def signatures(self) -> dict[str, tuple[Any, list[Any]]]:
        """name -> (restype, argtypes) for ctypes."""
        return {f.name: (f.ctypes_restype, f.ctypes_argtypes) for f in self.functions.values()}


def _normalize(c_type: str) -> str:
    t = re.sub(r"\s+", " ", c_type).strip()
    return re.sub(r"\s*\*", "*", t)


def _ctype(c_type: str, what: str) -> Any:
    if c_type in _SCALARS:
        return _SCALARS[c_type]
    if c_type == _STRING:
        return ctypes.c_char_p
    if c_type.endswith("*"):
        return ctypes.c_void_p
    raise AbiError(f"{what}: C type {c_type!r} has no ctypes mapping in kbit/_abi.py "
                   f"(known: {', '.join(sorted(_SCALARS))}, {_STRING}, pointers)")


def _params(name: str, text: str) -> tuple[tuple[str, str], ...]:
    text = _normalize(text)
    if text == "void":
        return ()
    if not text:
        raise AbiError(f"{name}: write an empty parameter list as (void)")
    out = []
    for i, param in enumerate(p.strip() for p in text.split(",")):
        m = _PARAM.match(param)
        if m is None or m.group("type") in ("", "const"):
            raise AbiError(f"{name}: parameter {i + 1} {param!r} is not `<type> <name>`")
        c_type = _normalize(m.group("type"))
        _ctype(c_type, f"{name}'s parameter {m.group('name')}")
        out.append((c_type, m.group("name")))
    return tuple(out)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_header(text: str, source: str = "kbit.h") -> Abi:
    """The ABI declared by the text of kbit.h. Raises AbiError for anything it cannot read exactly: a
    line starting with KBIT_API that is not a prototype, a duplicate, an unknown type, no version."""
    code = _strip_comments(text)
    functions: dict[str, Function] = {}
    for m in _PROTOTYPE.finditer(code):
        name = m.group("name")
        restype = _normalize(m.group("ret"))
        if name in functions:
            raise AbiError(f"{source}: {name} is declared twice")
        if restype != "void":
            _ctype(restype, f"{source}: {name}'s return type")
        functions[name] = Function(name, restype, _params(f"{source}: {name}", m.group("params")))
    starts = len(re.findall(r"^KBIT_API\b", code, re.M))
    if starts != len(functions):
        raise AbiError(f"{source}: {starts} lines start with KBIT_API but {len(functions)} parse as "
                       "`KBIT_API <type> kbit_<name>(<params>);`")
    versions = _VERSION.findall(code)
    if len(versions) != 1:
        raise AbiError(f"{source}: expected one `#define KBIT_ABI_VERSION <n>`, found {len(versions)}")
    if not functions:
        raise AbiError(f"{source}: no KBIT_API prototype")
    return Abi(int(versions[0]), functions)


@functools.cache
def _load(path: Path) -> Abi:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AbiError(f"{path}: cannot read the ABI header ({e.strerror or e}): reinstall kbit") from e
    return parse_header(text, str(path))


def load_abi(path: Optional[Path] = None) -> Abi:
    """The ABI of the packaged kbit.h (or `path`), read once per path."""
    return _load(HEADER if path is None else path)
