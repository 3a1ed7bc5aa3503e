"""kbit.h is the one table of the C ABI (kbit/_abi.py reads it): the ctypes bindings derived from it
agree with what the C++ compiler makes of the same prototypes, every library exports exactly its
functions, the package carries the source tree's header, and the runtime's callers name only
functions it declares. docs/kernels.md's recipe for a new entry point relies on these checks.
"""

from __future__ import annotations

import ast
import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kbit import _abi, _native
from kbit._elf import read_elf
from kbit._errors import KbitNativeError

REPO = Path(__file__).resolve().parents[1]
SOURCE_HEADER = REPO / "csrc" / "include" / "kbit.h"
ABI = _abi.load_abi()

# KBIT_ABI_VERSION -> Abi.fingerprint() of kbit.h's table at that version. A new or changed prototype
# changes the fingerprint: bump KBIT_ABI_VERSION (the runtime binds every function, so an older library
# cannot serve it) and add the new line here.
FINGERPRINTS = {
    3: "9372e8238619b50f",
    4: "592aaa5fa8f06b96",  # + kbit_last_path
    5: "9939930f4444255a",  # + kbit_repack_4bit_tiled, kbit_matmul_4bit_tiled
}

# What each ctypes type must be in C: (kind, size). Kinds: 0 void, 1 signed integer, 2 floating point,
# 3 pointer, 4 pointer to char.
_KIND = {None: (0, 0), ctypes.c_int: (1, ctypes.sizeof(ctypes.c_int)), ctypes.c_int32: (1, 4),
         ctypes.c_int64: (1, 8), ctypes.c_float: (2, 4), ctypes.c_void_p: (3, ctypes.sizeof(ctypes.c_void_p)),
         ctypes.c_char_p: (4, ctypes.sizeof(ctypes.c_char_p))}

_PRELUDE = r"""
#include <stddef.h>
#include <tuple>
#include <type_traits>
#include "kbit.h"
template <typename F> struct Sig;
template <typename R, typename... A> struct Sig<R (*)(A...)> {
  using Ret = R;
  using Args = std::tuple<A...>;
  static constexpr size_t arity = sizeof...(A);
};
template <typename T> struct Size { static constexpr size_t v = sizeof(T); };
template <> struct Size<void> { static constexpr size_t v = 0; };
template <typename T> constexpr int kind() {
  return std::is_void<T>::value ? 0
         : std::is_pointer<T>::value
             ? (std::is_same<typename std::remove_cv<typename std::remove_pointer<T>::type>::type, char>::value ? 4 : 3)
         : std::is_floating_point<T>::value                      ? 2
         : std::is_integral<T>::value && std::is_signed<T>::value ? 1
                                                                  : -1;
}
template <typename T, int K, size_t S> constexpr bool is() { return kind<T>() == K && Size<T>::v == S; }
"""


def _name(t) -> str:
    return "void" if t is None else t.__name__


def compiler_check(signatures: dict) -> str:
    """C++ that compiles only if each function of kbit.h has the arity, and each return value and
    parameter the kind and size, of the ctypes types in `signatures`."""
    lines = [_PRELUDE]
    for name, (restype, argtypes) in signatures.items():
        sig = f"Sig<decltype(&{name})>"
        lines.append(f'static_assert({sig}::arity == {len(argtypes)}, "{name}: ctypes binds {len(argtypes)} '
                     'parameters");')
        kind, size = _KIND[restype]
        lines.append(f'static_assert(is<{sig}::Ret, {kind}, {size}>(), "{name}: return type is not ctypes\' {_name(restype)}");')
        for i, t in enumerate(argtypes):
            kind, size = _KIND[t]
            lines.append(f"static_assert(is<std::tuple_element<{i}, {sig}::Args>::type, {kind}, {size}>(), "
                         f'"{name}: parameter {i + 1} is not ctypes\' {_name(t)}");')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cxx() -> str:
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        pytest.skip("needs a C++ compiler to read kbit.h as the libraries' compiler does")
    return found


def compile_check(cxx: str, tmp_path: Path, signatures: dict) -> subprocess.CompletedProcess:
    src = tmp_path / "abi_check.cpp"
    src.write_text(compiler_check(signatures))
    return subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{SOURCE_HEADER.parent}", str(src)],
                          capture_output=True, text=True)


def test_package_carries_the_source_trees_header() -> None:
    assert _abi.HEADER.read_bytes() == SOURCE_HEADER.read_bytes(), (
        f"{_abi.HEADER} is not {SOURCE_HEADER}: rebuild (tests/dev_layout.sh or nox -s build)")


def test_the_runtime_takes_version_and_signatures_from_the_header() -> None:
    assert _native.ABI_VERSION == ABI.version == _native.cpu_library().handle.kbit_abi_version()
    assert _native._SIGNATURES == ABI.signatures()
    assert {"kbit_abi_version", "kbit_build_info", "kbit_status_string", "kbit_last_path"} <= set(ABI.functions)


def test_a_changed_table_has_a_new_abi_version() -> None:
    latest = max(FINGERPRINTS)
    assert ABI.version >= latest, f"KBIT_ABI_VERSION {ABI.version} is below {latest}, already used"
    assert ABI.version in FINGERPRINTS, (
        f"KBIT_ABI_VERSION {ABI.version} is new: add `{ABI.version}: \"{ABI.fingerprint()}\"` to FINGERPRINTS")
    assert ABI.fingerprint() == FINGERPRINTS[ABI.version], (
        f"kbit.h's prototypes changed but KBIT_ABI_VERSION is still {ABI.version}: bump it to {latest + 1} and "
        f"add `{latest + 1}: \"{ABI.fingerprint()}\"` to FINGERPRINTS")


def test_ctypes_bindings_agree_with_the_compiler(cxx, tmp_path) -> None:
    r = compile_check(cxx, tmp_path, ABI.signatures())
    assert r.returncode == 0, r.stderr[-4000:]


def test_the_compiler_check_catches_a_wrong_binding(cxx, tmp_path) -> None:
    """The check itself can fail: one parameter's width, one arity and one return type changed."""
    sigs = ABI.signatures()
    restype, argtypes = sigs["kbit_gemv_4bit"]
    sigs["kbit_gemv_4bit"] = (restype, [*argtypes[:7], ctypes.c_int32, *argtypes[8:]])
    sigs["kbit_quantize_4bit"] = (sigs["kbit_quantize_4bit"][0], sigs["kbit_quantize_4bit"][1][:-1])
    sigs["kbit_last_path"] = (ctypes.c_void_p, [])
    r = compile_check(cxx, tmp_path, sigs)
    assert r.returncode != 0
    failed = set(re.findall(r"static assertion failed: (kbit_\w+: [^\n\"]*)", r.stderr))
    assert failed == {"kbit_gemv_4bit: parameter 8 is not ctypes' c_int",
                      "kbit_quantize_4bit: ctypes binds 7 parameters",
                      "kbit_last_path: return type is not ctypes' c_void_p"}, r.stderr[-4000:]


def libraries() -> list[Path]:
    return sorted(_abi.HEADER.parent.glob("libkbit_*.so"))


def test_every_library_exports_exactly_the_table() -> None:
    libs = libraries()
    assert any(p.name == "libkbit_cpu.so" for p in libs)
    for path in libs:
        exported = set(read_elf(path).exported_functions)
        assert exported == set(ABI.functions), (
            f"{path.name}: not in kbit.h: {sorted(exported - set(ABI.functions))}; "
            f"declared but not exported: {sorted(set(ABI.functions) - exported)}")


_LAST_PATH = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
lib.kbit_last_path.restype = ctypes.c_char_p
lib.kbit_status_string.restype = ctypes.c_char_p
i64 = ctypes.c_int64
tiled = lib.kbit_matmul_4bit_tiled(0, 1, None, None, None, None, None, i64(1), i64(1), i64(64), 64, None)
repack = lib.kbit_repack_4bit_tiled(None, None, None, None, i64(1), i64(64), 64)
print(repr(lib.kbit_last_path()), tiled, repack, lib.kbit_status_string(tiled).decode())
"""


def test_cuda_libraries_record_no_path_and_refuse_the_tiled_layout(cxx) -> None:
    """kbit.h: a CUDA library's kbit_last_path() is always "", and the CPU-only tiled layout's functions
    return KBIT_ERR_NOT_IN_THIS_LIBRARY. The CUDA sources as the emulation builds them (always) and
    every bundled CUDA library, each in its own process (no GPU, no driver needed)."""
    from cuda_emu import build as emu_build

    paths = [emu_build.build(sanitize=False), *(p for p in libraries() if p.name != "libkbit_cpu.so")]
    for path in paths:
        out = subprocess.run([sys.executable, "-c", _LAST_PATH, str(path)], capture_output=True, text=True)
        want = "b'' 8 8 not available in this library (the CPU library has it)"
        assert out.returncode == 0 and out.stdout.strip() == want, (path.name, out.stdout, out.stderr[-2000:])


def _library_calls(path: Path) -> set[str]:
    """Methods called on `_library(...)` results in a module: each must be a function of kbit.h."""
    calls = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call)
                and isinstance(node.func.value.func, ast.Name) and node.func.value.func.id == "_library"):
            calls.add(node.func.attr)
    return calls


def test_every_native_call_of_the_ops_is_declared() -> None:
    calls = _library_calls(Path(_native.__file__).with_name("_ops.py"))
    assert calls, "found no _library(...).<entry>(...) call in _ops.py"
    assert {f"kbit_{c}" for c in calls} <= set(ABI.functions), sorted(calls)


def test_methods_check_arity_and_status() -> None:
    lib = _native.cpu_library()
    with pytest.raises(TypeError, match=r"kbit_gemv_4bit takes 11 arguments \(dtype, quant_type, A, "):
        lib.gemv_4bit(0, 1, None, None, None, None, None, 1, 64, 64)  # no stream: ctypes would pass 10
    with pytest.raises(KbitNativeError, match="unsupported dtype"):
        lib.quantize_4bit(9, 1, None, None, None, 0, 64, None)
    with pytest.raises(AttributeError, match=r"kbit\.h declares no kbit_gemv_8bit"):
        lib.gemv_8bit  # noqa: B018
    assert lib.abi_version() == ABI.version and isinstance(lib.last_path(), str)


# --- the parser ---------------------------------------------------------------------------------------

GOOD = """
#define KBIT_ABI_VERSION 7
/* KBIT_API int kbit_in_a_comment(void); */
KBIT_API kbit_status kbit_f(int dtype, const void* A,
                             int64_t n, float x, void* stream);
KBIT_API const char* kbit_g(void);
"""


def test_parser_reads_types_names_and_version() -> None:
    abi = _abi.parse_header(GOOD)
    assert abi.version == 7 and list(abi.functions) == ["kbit_f", "kbit_g"]
    f = abi.functions["kbit_f"]
    assert f.returns_status and [n for _, n in f.params] == ["dtype", "A", "n", "x", "stream"]
    assert f.ctypes_argtypes == [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
    g = abi.functions["kbit_g"]
    assert not g.returns_status and g.ctypes_restype is ctypes.c_char_p and g.params == ()


@pytest.mark.parametrize(("text", "error"), [
    (GOOD + "KBIT_API int kbit_h(int);\n", "parameter 1 'int' is not `<type> <name>`"),
    (GOOD + "KBIT_API int kbit_h(double x);\n", "C type 'double' has no ctypes mapping"),
    (GOOD + "KBIT_API unsigned kbit_h(void);\n", "C type 'unsigned' has no ctypes mapping"),
    (GOOD + "KBIT_API int kbit_h();\n", "write an empty parameter list as (void)"),
    (GOOD + "KBIT_API int kbit_h(int (*cb)(int));\n", "lines start with KBIT_API but 2 parse"),
    (GOOD + "KBIT_API const char* kbit_g(void);\n", "kbit_g is declared twice"),
    (GOOD + "#define KBIT_ABI_VERSION 8\n", "expected one `#define KBIT_ABI_VERSION <n>`, found 2"),
    (GOOD.replace("#define KBIT_ABI_VERSION 7", ""), "found 0"),
], ids=["unnamed", "double", "unsigned", "empty-list", "callback", "twice", "two-versions", "no-version"])
def test_parser_refuses_what_it_cannot_read_exactly(text: str, error: str) -> None:
    with pytest.raises(_abi.AbiError) as e:
        _abi.parse_header(text)
    assert error in str(e.value)


def test_a_missing_header_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(_abi.AbiError, match=r"cannot read the ABI header .*reinstall kbit"):
        _abi.load_abi(tmp_path / "kbit.h")
