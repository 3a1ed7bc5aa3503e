"""Every native library in the installed package, read back from the file.

For the CPU library and each bundled CUDA library: the exported symbols are exactly the ABI of
csrc/include/kbit.h, NEEDED stays within the libc family (the CUDA runtime is static; libcuda.so.1
is opened at run time), the cubins and PTX are those of the library's matrix row, and the library's
own kbit_build_info() agrees with the manifest.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from kbit._elf import fatbin_archs, read_elf
from kbit._versions import parse_library_name

from ci.kbit_ci.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]


PACKAGE = Path(importlib.util.find_spec("kbit").submodule_search_locations[0])
MANIFEST = json.loads((PACKAGE / "manifest.json").read_text())
ENTRIES = {e["file"]: e for e in MANIFEST["libraries"]}
LIBRARIES = sorted(PACKAGE.glob("libkbit_*.so"))
CUDA_LIBRARIES = [p for p in LIBRARIES if parse_library_name(p.name)]
ROWS = {r.cuda: r for r in load_matrix()}
# A CPU-only package (`nox -s build -- --no-cuda`, the dev layout) has no CUDA library to read back:
# the CUDA checks are then one case skipped with that reason, never an empty parametrization.
CUDA_CASES = [pytest.param(p, id=p.name) for p in CUDA_LIBRARIES] or [
    pytest.param(None, id="no-cuda-library", marks=pytest.mark.skip(
        reason=f"{PACKAGE} carries no libkbit_cuda*.so (a --no-cuda build or the dev layout): no CUDA library to check")),
]

# The libc family: a library of the wheel may need these and nothing else.
NEEDED_ALLOWED = {
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2",
    "libgcc_s.so.1",
}


def header_abi() -> set[str]:
    text = (REPO / "csrc" / "include" / "kbit.h").read_text()
    return set(re.findall(r"KBIT_API\b[^;(]*?\b(kbit_\w+)\s*\(", text))


def test_header_declares_the_abi():
    abi = header_abi()
    assert {"kbit_abi_version", "kbit_build_info", "kbit_status_string"} <= abi
    assert all(name.startswith("kbit_") for name in abi)


def test_package_carries_the_cpu_library_and_a_manifest_that_matches_the_files():
    assert (PACKAGE / "libkbit_cpu.so").is_file()
    assert set(ENTRIES) == {p.name for p in LIBRARIES}
    assert MANIFEST["schema"] == 1
    for path in LIBRARIES:
        entry = ENTRIES[path.name]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("path", LIBRARIES, ids=lambda p: p.name)
def test_exports_exactly_the_abi(path):
    assert set(read_elf(path).exported_functions) == header_abi()


@pytest.mark.parametrize("path", LIBRARIES, ids=lambda p: p.name)
def test_needed_is_the_libc_family_only(path):
    needed = set(read_elf(path).needed)
    assert needed <= NEEDED_ALLOWED, f"unexpected dependencies: {sorted(needed - NEEDED_ALLOWED)}"


@pytest.mark.parametrize("path", CUDA_CASES)
def test_cuda_library_carries_its_rows_cubins_and_ptx(path):
    row = ROWS.get(parse_library_name(path.name))
    assert row is not None, f"{path.name} has no row in ci/matrix.toml"
    fat = read_elf(path).fatbin
    assert list(fat.cubin) == list(row.archs)
    assert list(fat.ptx) == [row.ptx]
    entry = ENTRIES[path.name]
    assert entry["archs"] == list(row.archs) and entry["ptx"] == [row.ptx]
    assert entry["cuda"] == str(row.cuda)
    assert entry["toolkit"]["version"].startswith(f"{row.cuda}."), entry["toolkit"]  # the row's toolkit built it


def test_cpu_library_carries_no_device_code():
    fat = read_elf(PACKAGE / "libkbit_cpu.so").fatbin
    assert fat.cubin == () and fat.ptx == ()


_BUILD_INFO = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
lib.kbit_build_info.restype = ctypes.c_char_p
lib.kbit_status_string.restype = ctypes.c_char_p
print(json.dumps({"abi": lib.kbit_abi_version(), "info": json.loads(lib.kbit_build_info()),
                  "ok": lib.kbit_status_string(0).decode()}))
"""


@pytest.mark.parametrize("path", LIBRARIES, ids=lambda p: p.name)
def test_build_info_agrees_with_the_manifest(path):
    # Each library in its own process: a CUDA library must load with no GPU and no driver.
    out = subprocess.run([sys.executable, "-c", _BUILD_INFO, str(path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    info, entry = got["info"], ENTRIES[path.name]
    assert got["abi"] == MANIFEST["abi"] == info["abi"]
    assert info["backend"] == entry["backend"]
    assert info["cuda"] == entry["cuda"]
    assert info["archs"] == entry["archs"]
    assert info["ptx"] == entry["ptx"]
    assert info["compiler"] == entry["compiler"]
    assert got["ok"] == "success"


def _driver_present() -> bool:
    for name in ("libcuda.so.1", "/usr/lib/wsl/lib/libcuda.so.1"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


_NO_DRIVER_CALL = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
lib.kbit_status_string.restype = ctypes.c_char_p
code = (ctypes.c_float * 256)()
fn = lib.kbit_quantize_blockwise_8bit
fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
               ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
# Non-NULL pointers that are never dereferenced on the host: without a driver the launch fails first.
status = fn(0, 4096, ctypes.addressof(code), 8192, 12288, 1024, 256, None)
print(status, lib.kbit_status_string(status).decode())
"""


@pytest.mark.skipif(_driver_present(), reason="a CUDA driver is present: this checks the no-driver path")
@pytest.mark.parametrize("path", CUDA_CASES)
def test_cuda_call_without_a_driver_returns_a_cuda_status(path):
    out = subprocess.run([sys.executable, "-c", _NO_DRIVER_CALL, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # KBIT_STATUS_CUDA_BASE + cudaErrorInsufficientDriver (35): the static runtime finds no driver.
    assert out.stdout.strip() == "1035 CUDA driver version is insufficient for CUDA runtime version", out.stdout


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A synthetic fat binary container with (kind, arch) entries and 8-byte payloads."""
    body = b""
    for kind, arch in entries:
        header = struct.pack("<HHIQIIHHI", kind, 0x101, 64, 8, 0, 0, 0, 0, arch).ljust(64, b"\0")
        body += header + b"\0" * 8
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_reader_on_synthetic_containers():
    section = _fatbin([(2, 75), (2, 90)]) + _fatbin([(1, 120), (2, 75)])
    fat = fatbin_archs(section)
    assert fat.cubin == ("75", "90") and fat.ptx == ("120",)
    assert fatbin_archs(b"") == fatbin_archs(b"\0" * 64)


def test_runtime_binds_every_function_of_the_abi():
    from kbit import _native

    assert set(_native._SIGNATURES) == header_abi()
