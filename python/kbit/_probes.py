"""Facts about the machine, gathered cheaply and never fatally.

Each probe returns a frozen dataclass of plain data. A probe that cannot find out something records
the value as unknown (None, or an empty tuple) and says why in `error`; it never raises. The policy
(`_policy.select`) decides from these values alone, so it can be table-tested without a GPU.

The probes are:
  * `probe_torch()`: torch's version, its CUDA/HIP build, and its devices, without initialising CUDA
    (device capabilities are read only if torch has initialised CUDA already);
  * `probe_driver()`: the NVIDIA driver through ctypes on libcuda.so.1 (cuInit, cuDriverGetVersion,
    cuDeviceGetCount, cuDeviceGetAttribute, cuDeviceGetName);
and, from kbit._manifest (re-exported here, where the runtime has always found them), the package's
manifest: `probe_manifest()` reads manifest.json, the pure `parse_manifest()` parses it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ._manifest import MANIFEST_NAME, LibraryEntry, Manifest, parse_manifest, probe_manifest
from ._versions import CudaVersion

__all__ = [
    "DRIVER_LIBRARIES",
    "MANIFEST_NAME",
    "Device",
    "DriverProbe",
    "LibraryEntry",
    "Manifest",
    "Probes",
    "TorchProbe",
    "driver_branch",
    "parse_manifest",
    "probe_all",
    "probe_driver",
    "probe_manifest",
    "probe_torch",
]

# The soname, then the path WSL2 mounts the Windows driver's library at.
DRIVER_LIBRARIES = ("libcuda.so.1", "/usr/lib/wsl/lib/libcuda.so.1")

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class Device:
    """A visible CUDA device."""

    index: int
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class TorchProbe:
    found: bool
    """torch is importable and was imported."""
    version: Optional[str] = None
    cuda: Optional[CudaVersion] = None
    """The CUDA version torch was built with; None for a CPU-only or ROCm build."""
    hip: Optional[str] = None
    """The HIP version of a ROCm build of torch."""
    device_count: Optional[int] = None
    """Visible devices according to torch; None when unknown."""
    capabilities: tuple[tuple[int, int], ...] = ()
    """Per device, only when torch had already initialised CUDA (reading them would initialise it)."""
    error: Optional[str] = None
    """Why something above is unknown."""


@dataclass(frozen=True)
class DriverProbe:
    found: bool
    """A libcuda.so.1 was opened."""
    path: Optional[str] = None
    version: Optional[CudaVersion] = None
    """The highest CUDA version the driver supports (cuDriverGetVersion)."""
    devices: tuple[Device, ...] = ()
    error: Optional[str] = None
    """Why the driver or its devices are unknown (e.g. cuInit's error); None when all went well."""
    branch: Optional[int] = None
    """The driver branch (550 for 550.54.15), from libcuda's file name or /proc/driver/nvidia/version;
    None when neither tells (e.g. WSL's unversioned libcuda.so.1). Only minor-version compatibility
    needs it, and the policy does not assume it when this is unknown."""
    branch_error: Optional[str] = None
    """Why reading the branch failed (an unreadable /proc), when it did; `branch` is then None."""


@dataclass(frozen=True)
class Probes:
    torch: TorchProbe
    driver: DriverProbe


# --- torch ---------------------------------------------------------------------------------------


def probe_torch() -> TorchProbe:
    """torch's build and devices. Imports torch only if it is installed; never initialises CUDA."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            if importlib.util.find_spec("torch") is None:
                return TorchProbe(found=False, error="torch is not installed")
            import torch
        except Exception as e:  # a broken install: say so, the CPU library still works without torch
            return TorchProbe(found=False, error=f"import torch failed: {type(e).__name__}: {e}")
    errors: list[str] = []
    version = getattr(torch, "__version__", None)
    cuda: Optional[CudaVersion] = None
    hip: Optional[str] = None
    try:
        cuda_text = getattr(torch.version, "cuda", None)
        hip = getattr(torch.version, "hip", None)
        cuda = CudaVersion.parse(cuda_text) if cuda_text else None
    except Exception as e:
        errors.append(f"torch.version: {type(e).__name__}: {e}")
    device_count: Optional[int] = 0
    capabilities: tuple[tuple[int, int], ...] = ()
    if cuda is not None or hip is not None:
        # device_count() asks NVML and does not initialise CUDA; capabilities would, so they are
        # read only when torch has initialised CUDA already.
        try:
            device_count = int(torch.cuda.device_count())
            if torch.cuda.is_initialized():
                capabilities = tuple(
                    tuple(torch.cuda.get_device_capability(i)) for i in range(device_count)  # type: ignore[misc]
                )
        except Exception as e:
            device_count = None
            errors.append(f"torch.cuda: {type(e).__name__}: {e}")
    return TorchProbe(
        found=True,
        version=version,
        cuda=cuda,
        hip=hip,
        device_count=device_count,
        capabilities=capabilities,
        error="; ".join(errors) or None,
    )


# --- driver --------------------------------------------------------------------------------------


def _cu_error(lib: Any, status: int) -> str:
    name = ctypes.c_char_p()
    try:
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorName.restype = ctypes.c_int
        if lib.cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode(errors='replace')} ({status})"
    except Exception as e:  # an old driver without cuGetErrorName: the number alone still identifies it
        return f"CUresult {status} (unnamed: {type(e).__name__}: {e})"
    return f"CUresult {status}"


def _query_driver(lib: Any, path: str) -> DriverProbe:
    c_int_p = ctypes.POINTER(ctypes.c_int)
    lib.cuInit.argtypes = [ctypes.c_uint]
    lib.cuDriverGetVersion.argtypes = [c_int_p]
    lib.cuDeviceGetCount.argtypes = [c_int_p]
    lib.cuDeviceGet.argtypes = [c_int_p, ctypes.c_int]
    lib.cuDeviceGetAttribute.argtypes = [c_int_p, ctypes.c_int, ctypes.c_int]
    lib.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    for fn in ("cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet",
               "cuDeviceGetAttribute", "cuDeviceGetName"):
        getattr(lib, fn).restype = ctypes.c_int

    version: Optional[CudaVersion] = None
    value = ctypes.c_int(0)
    status = lib.cuDriverGetVersion(ctypes.byref(value))  # works before cuInit
    if status != 0:
        return DriverProbe(True, path, error=f"cuDriverGetVersion failed: {_cu_error(lib, status)}")
    version = CudaVersion.from_int(value.value)
    status = lib.cuInit(0)
    if status != 0:
        return DriverProbe(True, path, version, error=f"cuInit failed: {_cu_error(lib, status)}")
    status = lib.cuDeviceGetCount(ctypes.byref(value))
    if status != 0:
        return DriverProbe(True, path, version, error=f"cuDeviceGetCount failed: {_cu_error(lib, status)}")
    devices = []
    for ordinal in range(value.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        for status, what in (
            (lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet"),
            (lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
             "cuDeviceGetAttribute(major)"),
            (lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
             "cuDeviceGetAttribute(minor)"),
            (lib.cuDeviceGetName(name, len(name), dev), "cuDeviceGetName"),
        ):
            if status != 0:
                return DriverProbe(True, path, version, tuple(devices),
                                   error=f"device {ordinal}: {what} failed: {_cu_error(lib, status)}")
        devices.append(Device(ordinal, name.value.decode(errors="replace"), (major.value, minor.value)))
    return DriverProbe(True, path, version, tuple(devices))


_BRANCH_FILE_RE = re.compile(r"libcuda\.so\.(\d{3,4})\.\d+")
_BRANCH_PROC_RE = re.compile(r"Kernel Module\s+(?:for \S+\s+)?(\d{3,4})\.\d+")
PROC_DRIVER_VERSION = "/proc/driver/nvidia/version"


def driver_branch(maps: str = "/proc/self/maps", proc_version: str = PROC_DRIVER_VERSION) -> Optional[int]:
    """The loaded libcuda's branch: its real file is libcuda.so.<branch>.<minor>[.<patch>]; else the
    kernel module's version. None when neither says (never guessed)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[5].strip() for line in f
                     if "libcuda.so" in line and len(line.split(None, 5)) == 6}
    except OSError:
        paths = set()
    for path in sorted(paths):
        m = _BRANCH_FILE_RE.search(os.path.basename(os.path.realpath(path)))
        if m:
            return int(m.group(1))
    try:
        with open(proc_version, encoding="utf-8", errors="replace") as f:
            m = _BRANCH_PROC_RE.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def probe_driver(libraries: tuple[str, ...] = DRIVER_LIBRARIES) -> DriverProbe:
    """The NVIDIA driver's CUDA version and devices; `found=False` with the reasons when absent."""
    tried = []
    for path in libraries:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(str(e) if path in str(e) else f"{path}: {e}")
            continue
        try:
            probe = _query_driver(lib, path)
        except Exception as e:  # a driver missing an entry point: report it, never fail
            probe = DriverProbe(True, path, error=f"{type(e).__name__}: {e}")
        branch_error = None
        try:
            branch = driver_branch()
        except Exception as e:  # an odd /proc: the branch stays unknown, which the policy handles
            branch, branch_error = None, f"driver branch: {type(e).__name__}: {e}"
        return DriverProbe(probe.found, probe.path, probe.version, probe.devices, probe.error, branch, branch_error)
    return DriverProbe(False, error="; ".join(tried))


def probe_all() -> Probes:
    return Probes(torch=probe_torch(), driver=probe_driver())
