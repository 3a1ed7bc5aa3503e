"""The library policy, table-tested on plain data: no GPU, driver or native library involved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
from kbit import KbitConfigError, KbitManifestError
from kbit._policy import MIN_DRIVER, check_overrides, covers, how_covered, select
from kbit._probes import (
    Device,
    DriverProbe,
    LibraryEntry,
    Manifest,
    Probes,
    TorchProbe,
)
from kbit._versions import CudaVersion, cuda_library_name

BASE = ("70", "75", "80", "86", "89", "90")
CPU = LibraryEntry("libkbit_cpu.so", "cpu", None, (), ())


def lib(version: str, archs: tuple[str, ...] = BASE, ptx: tuple[str, ...] = ("90",)) -> LibraryEntry:
    v = CudaVersion.parse(version)
    return LibraryEntry(cuda_library_name(v), "cuda", v, archs, ptx)


def manifest(*libs: LibraryEntry | str) -> Manifest:
    entries = tuple(lib(x) if isinstance(x, str) else x for x in libs)
    return Manifest("manifest.json", (CPU, *entries), "0.1.0", 1)


def probes(torch_cuda: Optional[str] = None, driver: Optional[str] = None,
           caps: tuple[tuple[int, int], ...] = ((8, 0),), hip: Optional[str] = None,
           driver_error: Optional[str] = None, branch: Optional[int] = None) -> Probes:
    t = TorchProbe(True, "2.13.0", CudaVersion.parse(torch_cuda) if torch_cuda else None, hip,
                   len(caps) if (torch_cuda and driver) or hip else 0)
    if driver is None:
        d = DriverProbe(False, error="libcuda.so.1: cannot open shared object file")
    else:
        devices = tuple(Device(i, f"GPU{i}", cap) for i, cap in enumerate(caps))
        d = DriverProbe(True, "libcuda.so.1", CudaVersion.parse(driver), devices, driver_error, branch)
    return Probes(t, d)


@dataclass
class Case:
    id: str
    probes: Probes
    manifest: Manifest
    env: dict[str, str] = field(default_factory=dict)
    backend: str = "cuda"
    file: Optional[str] = None
    exact: bool = False
    fallbacks: tuple[str, ...] = ()
    warn: bool = False
    gpu: bool = True
    override: Optional[str] = None
    risky: bool = False
    line: str = ""
    """The whole reason line, as `python -m kbit` and the warning show it: what happened and the fix."""
    whys: dict[str, str] = field(default_factory=dict)
    """Every bundled CUDA library -> "taken: why" or "rejected: why", exactly."""


CASES = [
    Case("exact-torch-match", probes("12.4", "12.4"), manifest("11.8", "12.4", "13.0"), file='libkbit_cuda124.so', exact=True, fallbacks=('libkbit_cuda118.so',),
         line="using libkbit_cuda124.so: exact match of torch's CUDA 12.4 (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)",
         whys={
             'libkbit_cuda118.so': 'rejected: usable, but libkbit_cuda124.so is preferred (a fallback)',
             'libkbit_cuda124.so': "taken: exact match of torch's CUDA 12.4",
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.4 (needs NVIDIA driver ≥ 580)',
         }),
    # torch 12.4 on a 12.4 driver (branch 550), an A100, and no 12.4 library: 12.5 runs by minor-version
    # compatibility (an sm_80 cubin, branch ≥ 525); 11.8 (another major, driver runs it) is the fallback.
    Case("minor-version-compatibility", probes("12.4", "12.4", branch=550), manifest("11.8", "12.5", "13.0"), file='libkbit_cuda125.so', fallbacks=('libkbit_cuda118.so',),
         line='using libkbit_cuda125.so: no bundled CUDA 12.4 library; minor-version compatibility: CUDA 12.5 > driver CUDA 12.4, driver 550 ≥ 525, and every GPU has a cubin (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)',
         whys={
             'libkbit_cuda118.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
             'libkbit_cuda125.so': 'taken: minor-version compatibility: CUDA 12.5 > driver CUDA 12.4, driver 550 ≥ 525, and every GPU has a cubin',
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.4 (needs NVIDIA driver ≥ 580)',
         }),
    # The same with the branch unknown: minor-version compatibility is not assumed; 11.8 runs natively
    # (cross-major, said so).
    Case("branch-unknown-no-minor-compat", probes("12.4", "12.4"), manifest("11.8", "12.5", "13.0"), file='libkbit_cuda118.so',
         line='using libkbit_cuda118.so: no bundled CUDA 12.4 library; cross-major: no bundled CUDA 12.x runs here; CUDA 11.8 runs ≤ driver CUDA 12.4 (legal: kbit links its CUDA runtime statically) (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)',
         whys={
             'libkbit_cuda118.so': 'taken: cross-major: no bundled CUDA 12.x runs here; CUDA 11.8 runs ≤ driver CUDA 12.4 (legal: kbit links its CUDA runtime statically)',
             'libkbit_cuda125.so': 'rejected: CUDA 12.5 > driver CUDA 12.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 555)',
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.4 (needs NVIDIA driver ≥ 580)',
         }),
    Case("minor-compat-needs-cubin", probes("12.4", "12.4", caps=((12, 0),), branch=550), manifest(lib("12.5", archs=("80",), ptx=("80",))), backend='cpu', file='libkbit_cpu.so', warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: 12.5): using the CPU library; update the NVIDIA driver to ≥ 555 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda125.so': 'rejected: CUDA 12.5 > driver CUDA 12.4: minor-version compatibility needs a cubin, and sm_120 (GPU 0 GPU0) has none (cubins 80; PTX from CUDA 12.5 cannot be JIT-compiled by this driver)',
         }),
    Case("minor-compat-below-floor", probes("12.4", "12.4", branch=520), manifest("12.5"), backend='cpu', file='libkbit_cpu.so', warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: 12.5): using the CPU library; update the NVIDIA driver to ≥ 555 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda125.so': 'rejected: CUDA 12.5 > driver CUDA 12.4 and driver 520 is below the CUDA 12.x minor-version compatibility floor 525 (needs NVIDIA driver ≥ 555)',
         }),
    Case("minor-compat-lowest-above-driver", probes("12.4", "12.4", branch=550), manifest("12.6", "12.5", "12.8"), file='libkbit_cuda125.so', fallbacks=('libkbit_cuda126.so', 'libkbit_cuda128.so'),
         line='using libkbit_cuda125.so: no bundled CUDA 12.4 library; minor-version compatibility: CUDA 12.5 > driver CUDA 12.4, driver 550 ≥ 525, and every GPU has a cubin (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)',
         whys={
             'libkbit_cuda125.so': 'taken: minor-version compatibility: CUDA 12.5 > driver CUDA 12.4, driver 550 ≥ 525, and every GPU has a cubin',
             'libkbit_cuda126.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
             'libkbit_cuda128.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
         }),
    Case("native-before-minor-compat", probes("12.4", "12.4", branch=550), manifest("12.2", "12.5"), file='libkbit_cuda122.so', fallbacks=('libkbit_cuda125.so',),
         line='using libkbit_cuda122.so: no bundled CUDA 12.4 library, CUDA 12.2 is the highest bundled 12.x that runs on torch CUDA 12.4 with driver CUDA 12.4 (GPUs sm_80)',
         whys={
             'libkbit_cuda122.so': 'taken: highest usable CUDA 12.x ≤ driver CUDA 12.4',
             'libkbit_cuda125.so': 'rejected: usable, but libkbit_cuda122.so is preferred (a fallback)',
         }),
    Case("pascal-older-than-every-library", probes("12.4", "12.4", caps=((6, 1),)), manifest("12.4"), backend='cpu', file='libkbit_cpu.so', warn=True,
         line='GPU sm_61 (GPU0) is older than every bundled library (sm_70+): using the CPU library; build from source with `nox -s build -- --arch 61`',
         whys={
             'libkbit_cuda124.so': 'rejected: no cubin or PTX runs on sm_61 (GPU 0 GPU0): cubins 70,75,80,86,89,90, PTX 90',
         }),
    Case("highest-same-major-at-most-driver", probes("12.4", "12.6"), manifest("11.8", "12.2", "12.5", "12.8", "13.0"), file='libkbit_cuda125.so', fallbacks=('libkbit_cuda122.so', 'libkbit_cuda118.so'),
         line='using libkbit_cuda125.so: no bundled CUDA 12.4 library, CUDA 12.5 is the highest bundled 12.x that runs on torch CUDA 12.4 with driver CUDA 12.6 (GPUs sm_80)',
         whys={
             'libkbit_cuda118.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
             'libkbit_cuda122.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
             'libkbit_cuda125.so': 'taken: highest usable CUDA 12.x ≤ driver CUDA 12.6',
             'libkbit_cuda128.so': 'rejected: CUDA 12.8 > driver CUDA 12.6 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 570)',
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.6 (needs NVIDIA driver ≥ 580)',
         }),
    Case("exact-preferred-over-higher", probes("12.4", "12.9"), manifest("12.4", "12.8"), file='libkbit_cuda124.so', exact=True, fallbacks=('libkbit_cuda128.so',),
         line="using libkbit_cuda124.so: exact match of torch's CUDA 12.4 (torch CUDA 12.4 with driver CUDA 12.9; GPUs sm_80)",
         whys={
             'libkbit_cuda124.so': "taken: exact match of torch's CUDA 12.4",
             'libkbit_cuda128.so': 'rejected: usable, but libkbit_cuda124.so is preferred (a fallback)',
         }),
    Case("driver-older-than-every-library", probes(None, "11.4"), manifest("11.8", "12.4", "12.5", "13.0"), backend='cpu', file='libkbit_cpu.so', warn=True,
         line='no bundled CUDA library runs on driver CUDA 11.4 (bundled: 11.8, 12.4, 12.5, 13.0): using the CPU library; update the NVIDIA driver to ≥ 520 or build from source with `nox -s build -- --cuda 11.4`',
         whys={
             'libkbit_cuda118.so': 'rejected: CUDA 11.8 > driver CUDA 11.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 520)',
             'libkbit_cuda124.so': 'rejected: CUDA 12.4 > driver CUDA 11.4 (needs NVIDIA driver ≥ 550)',
             'libkbit_cuda125.so': 'rejected: CUDA 12.5 > driver CUDA 11.4 (needs NVIDIA driver ≥ 555)',
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 11.4 (needs NVIDIA driver ≥ 580)',
         }),
    Case("no-driver", probes("12.4", None), manifest("12.4"), backend='cpu', file='libkbit_cpu.so', gpu=False,
         line='no NVIDIA driver found (libcuda.so.1: cannot open shared object file): using the CPU library; install the NVIDIA driver to use a GPU',
         whys={
             'libkbit_cuda124.so': 'rejected: no NVIDIA driver',
         }),
    Case("cpu-only-torch-uses-driver-version", probes(None, "12.4", caps=((8, 6),)), manifest("12.4", "13.0"), file='libkbit_cuda124.so', exact=True,
         line="using libkbit_cuda124.so: exact match of the driver's CUDA 12.4 (driver CUDA 12.4; GPUs sm_86)",
         whys={
             'libkbit_cuda124.so': "taken: exact match of the driver's CUDA 12.4",
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.4 (needs NVIDIA driver ≥ 580)',
         }),
    Case("driver-13-with-only-12-libs", probes("12.4", "13.0"), manifest("12.4", "12.8"), file='libkbit_cuda124.so', exact=True, fallbacks=('libkbit_cuda128.so',),
         line="using libkbit_cuda124.so: exact match of torch's CUDA 12.4 (torch CUDA 12.4 with driver CUDA 13.0; GPUs sm_80)",
         whys={
             'libkbit_cuda124.so': "taken: exact match of torch's CUDA 12.4",
             'libkbit_cuda128.so': 'rejected: usable, but libkbit_cuda124.so is preferred (a fallback)',
         }),
    Case("no-visible-device", probes("12.4", "12.4", caps=()), manifest("12.4"), backend='cpu', file='libkbit_cpu.so', gpu=False,
         line='no CUDA device is visible: using the CPU library; check CUDA_VISIBLE_DEVICES and nvidia-smi',
         whys={
             'libkbit_cuda124.so': 'rejected: no CUDA device visible',
         }),
    Case("cuinit-failed", probes("12.4", "12.4", caps=(), driver_error="cuInit failed: CUDA_ERROR_NO_DEVICE (100)"), manifest("12.4"), backend='cpu', file='libkbit_cpu.so', gpu=False,
         line='the NVIDIA driver reports no usable device (cuInit failed: CUDA_ERROR_NO_DEVICE (100)): using the CPU library; check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES',
         whys={
             'libkbit_cuda124.so': 'rejected: no usable CUDA device',
         }),
    Case("rocm-torch", probes(None, None, hip="6.2"), manifest("12.4"), backend='cpu', file='libkbit_cpu.so', warn=True,
         line='torch is a ROCm build (HIP 6.2) and kbit bundles no ROCm library: using the CPU library for CPU tensors; GPU tensors are not supported',
         whys={
             'libkbit_cuda124.so': 'rejected: torch is a ROCm build',
         }),
    # Blackwell sm_120: no cubin, but PTX compute_90 JIT-compiles for it.
    Case("ptx-covers-newer-gpu", probes("12.8", "12.8", caps=((12, 0),)), manifest("12.8"), file='libkbit_cuda128.so', exact=True,
         line="using libkbit_cuda128.so: exact match of torch's CUDA 12.8 (torch CUDA 12.8 with driver CUDA 12.8; GPUs sm_120)",
         whys={
             'libkbit_cuda128.so': "taken: exact match of torch's CUDA 12.8",
         }),
    Case("no-code-for-gpu", probes("12.8", "12.8", caps=((12, 0),)), manifest(lib("12.8", ptx=())), backend='cpu', file='libkbit_cpu.so', warn=True,
         line="GPU sm_120 (GPU0) is not covered by any bundled library's cubins or PTX: using the CPU library; build from source with `nox -s build -- --arch 120`",
         whys={
             'libkbit_cuda128.so': 'rejected: no cubin or PTX runs on sm_120 (GPU 0 GPU0): cubins 70,75,80,86,89,90, PTX -',
         }),
    Case("every-device-must-be-covered", probes("12.4", "12.4", caps=((8, 0), (6, 1))), manifest(lib("12.4", ptx=()), lib("12.2", archs=("61", "80"), ptx=())), file='libkbit_cuda122.so',
         line='using libkbit_cuda122.so: no bundled CUDA 12.4 library, CUDA 12.2 is the highest bundled 12.x that runs on torch CUDA 12.4 with driver CUDA 12.4 (GPUs sm_61, sm_80)',
         whys={
             'libkbit_cuda122.so': 'taken: highest usable CUDA 12.x ≤ driver CUDA 12.4',
             'libkbit_cuda124.so': 'rejected: no cubin or PTX runs on sm_61 (GPU 1 GPU1): cubins 70,75,80,86,89,90, PTX -',
         }),
    # Overrides.
    Case("backend-cpu", probes("12.4", "12.4"), manifest("12.4"), env={'KBIT_BACKEND': 'cpu'}, backend='cpu', file='libkbit_cpu.so', override='KBIT_BACKEND',
         line='KBIT_BACKEND=cpu: using the CPU library only',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_BACKEND=cpu',
         }),
    Case("backend-auto-spelled-out", probes("12.4", "12.4"), manifest("12.4"), env={'KBIT_BACKEND': ' Auto '}, file='libkbit_cuda124.so', exact=True,
         line="using libkbit_cuda124.so: exact match of torch's CUDA 12.4 (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)",
         whys={
             'libkbit_cuda124.so': "taken: exact match of torch's CUDA 12.4",
         }),
    Case("cuda-version-short", probes("12.4", "12.6"), manifest("12.4", "12.6"), env={'KBIT_CUDA_VERSION': '126'}, file='libkbit_cuda126.so', override='KBIT_CUDA_VERSION',
         line='KBIT_CUDA_VERSION=12.6: using libkbit_cuda126.so',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_CUDA_VERSION=12.6',
             'libkbit_cuda126.so': 'taken: KBIT_CUDA_VERSION',
         }),
    Case("cuda-version-dotted", probes("12.4", "12.6"), manifest("12.4", "12.6"), env={'KBIT_CUDA_VERSION': '12.4'}, file='libkbit_cuda124.so', exact=True, override='KBIT_CUDA_VERSION',
         line='KBIT_CUDA_VERSION=12.4: using libkbit_cuda124.so',
         whys={
             'libkbit_cuda124.so': 'taken: KBIT_CUDA_VERSION',
             'libkbit_cuda126.so': 'rejected: KBIT_CUDA_VERSION=12.4',
         }),
    Case("cuda-version-forced-past-driver", probes("12.4", "12.4"), manifest("12.4", "12.8"), env={'KBIT_CUDA_VERSION': '12.8'}, file='libkbit_cuda128.so', warn=True, override='KBIT_CUDA_VERSION', risky=True,
         line='KBIT_CUDA_VERSION=12.8: using libkbit_cuda128.so although it may not run here (CUDA 12.8 > driver CUDA 12.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 570))',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_CUDA_VERSION=12.8',
             'libkbit_cuda128.so': 'taken: KBIT_CUDA_VERSION',
         }),
    Case("library-path", probes(None, None), manifest("12.4"), env={'KBIT_LIBRARY': '/opt/kbit/libkbit_cuda124.so'}, file='/opt/kbit/libkbit_cuda124.so', warn=True, gpu=False, override='KBIT_LIBRARY',
         line='KBIT_LIBRARY=/opt/kbit/libkbit_cuda124.so: using that library without checking it fits this machine',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_LIBRARY is set',
         }),
    # The driver lists no devices (its device query failed quietly) but torch, which had initialised CUDA,
    # knows their capabilities: those are judged.
    Case("torch-capabilities-when-the-driver-lists-none",
         Probes(TorchProbe(True, "2.13.0", CudaVersion(12, 4), None, 1, ((8, 0),)),
                DriverProbe(True, "libcuda.so.1", CudaVersion(12, 4), ())), manifest("12.4"),
         file="libkbit_cuda124.so", exact=True,
         line="using libkbit_cuda124.so: exact match of torch's CUDA 12.4 (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_80)",
         whys={
             'libkbit_cuda124.so': "taken: exact match of torch's CUDA 12.4",
         }),
    Case("torch-capabilities-judged-like-the-driver-s",
         Probes(TorchProbe(True, "2.13.0", CudaVersion(12, 4), None, 2, ((8, 0), (6, 1))),
                DriverProbe(True, "libcuda.so.1", CudaVersion(12, 4), ())), manifest("12.4"),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='GPU sm_61 is older than every bundled library (sm_70+): using the CPU library; build from source with `nox -s build -- --arch 61`',
         whys={
             'libkbit_cuda124.so': 'rejected: no cubin or PTX runs on sm_61 (GPU 1): cubins 70,75,80,86,89,90, PTX 90',
         }),
    # torch counts a device the driver probe did not list: a GPU is there, so the CPU fallback warns.
    Case("torch-device-count-means-a-gpu",
         Probes(TorchProbe(True, "2.13.0", CudaVersion(12, 4), None, 1),
                DriverProbe(True, "libcuda.so.1", CudaVersion(12, 4), ())), manifest("12.4"),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no CUDA device is visible: using the CPU library; check CUDA_VISIBLE_DEVICES and nvidia-smi',
         whys={
             'libkbit_cuda124.so': 'rejected: no CUDA device visible',
         }),
    # torch's CUDA 12.5 on a 12.4 driver: the exact library runs by minor-version compatibility.
    Case("exact-by-minor-version-compatibility", probes("12.5", "12.4", branch=550), manifest("12.4", "12.5"),
         file="libkbit_cuda125.so", exact=True, fallbacks=("libkbit_cuda124.so",),
         line="using libkbit_cuda125.so: exact match of torch's CUDA 12.5, run by minor-version compatibility (driver CUDA 12.4, driver 550 ≥ 525, every GPU has a cubin) (torch CUDA 12.5 with driver CUDA 12.4; GPUs sm_80)",
         whys={
             'libkbit_cuda124.so': 'rejected: usable, but libkbit_cuda125.so is preferred (a fallback)',
             'libkbit_cuda125.so': "taken: exact match of torch's CUDA 12.5, run by minor-version compatibility (driver CUDA 12.4, driver 550 ≥ 525, every GPU has a cubin)",
         }),
    # No 12.x library at all on a 13.0 driver: other majors, natively runnable ones first (highest first),
    # then those that run by minor-version compatibility.
    Case("cross-major-native-first", probes("12.4", "13.0", branch=580), manifest("11.8", "13.0", "13.1"),
         file="libkbit_cuda130.so", fallbacks=("libkbit_cuda118.so", "libkbit_cuda131.so"),
         line='using libkbit_cuda130.so: no bundled CUDA 12.4 library; cross-major: no bundled CUDA 12.x runs here; CUDA 13.0 runs ≤ driver CUDA 13.0 (legal: kbit links its CUDA runtime statically) (torch CUDA 12.4 with driver CUDA 13.0; GPUs sm_80)',
         whys={
             'libkbit_cuda118.so': 'rejected: usable, but libkbit_cuda130.so is preferred (a fallback)',
             'libkbit_cuda130.so': 'taken: cross-major: no bundled CUDA 12.x runs here; CUDA 13.0 runs ≤ driver CUDA 13.0 (legal: kbit links its CUDA runtime statically)',
             'libkbit_cuda131.so': 'rejected: usable, but libkbit_cuda130.so is preferred (a fallback)',
         }),
    Case("cross-major-by-minor-version-compatibility", probes("12.4", "13.0", branch=580), manifest("13.1"),
         file="libkbit_cuda131.so",
         line='using libkbit_cuda131.so: no bundled CUDA 12.4 library; cross-major: no bundled CUDA 12.x runs here; CUDA 13.1 runs by minor-version compatibility (legal: kbit links its CUDA runtime statically) (torch CUDA 12.4 with driver CUDA 13.0; GPUs sm_80)',
         whys={
             'libkbit_cuda131.so': 'taken: cross-major: no bundled CUDA 12.x runs here; CUDA 13.1 runs by minor-version compatibility (legal: kbit links its CUDA runtime statically)',
         }),
    Case("same-major-natives-highest-first", probes("12.4", "12.9"), manifest("12.2", "12.5", "12.8"),
         file="libkbit_cuda128.so", fallbacks=("libkbit_cuda125.so", "libkbit_cuda122.so"),
         line='using libkbit_cuda128.so: no bundled CUDA 12.4 library, CUDA 12.8 is the highest bundled 12.x that runs on torch CUDA 12.4 with driver CUDA 12.9 (GPUs sm_80)',
         whys={
             'libkbit_cuda122.so': 'rejected: usable, but libkbit_cuda128.so is preferred (a fallback)',
             'libkbit_cuda125.so': 'rejected: usable, but libkbit_cuda128.so is preferred (a fallback)',
             'libkbit_cuda128.so': 'taken: highest usable CUDA 12.x ≤ driver CUDA 12.9',
         }),
    Case("library-path-with-a-gpu", probes("12.4", "12.4"), manifest("12.4"),
         env={"KBIT_LIBRARY": " /opt/kbit/libkbit_cuda124.so "}, file="/opt/kbit/libkbit_cuda124.so", warn=True,
         override='KBIT_LIBRARY',
         line='KBIT_LIBRARY=/opt/kbit/libkbit_cuda124.so: using that library without checking it fits this machine',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_LIBRARY is set',
         }),
    Case("backend-cpu-without-a-gpu", probes(None, None), manifest("12.4"), env={"KBIT_BACKEND": "CPU"},
         backend="cpu", file="libkbit_cpu.so",
         gpu=False, override='KBIT_BACKEND',
         line='KBIT_BACKEND=cpu: using the CPU library only',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_BACKEND=cpu',
         }),
    # Forced past the driver, but minor-version compatibility holds (branch known, cubins): not risky.
    Case("cuda-version-forced-by-minor-compat", probes("12.4", "12.4", branch=550), manifest("12.4", "12.5"),
         env={"KBIT_CUDA_VERSION": "12.5"}, file="libkbit_cuda125.so",
         override='KBIT_CUDA_VERSION',
         line='KBIT_CUDA_VERSION=12.5: using libkbit_cuda125.so',
         whys={
             'libkbit_cuda124.so': 'rejected: KBIT_CUDA_VERSION=12.5',
             'libkbit_cuda125.so': 'taken: KBIT_CUDA_VERSION',
         }),
    Case("cuda-version-forced-without-torch-or-driver", probes(None, None), manifest("12.4"),
         env={"KBIT_CUDA_VERSION": "cu124"}, file="libkbit_cuda124.so",
         gpu=False, override='KBIT_CUDA_VERSION',
         line='KBIT_CUDA_VERSION=12.4: using libkbit_cuda124.so',
         whys={
             'libkbit_cuda124.so': 'taken: KBIT_CUDA_VERSION',
         }),
    Case("cuda-version-forced-on-an-uncovered-gpu", probes("12.4", "12.4", caps=((6, 1),)), manifest("12.4"),
         env={"KBIT_CUDA_VERSION": "12.4"}, file="libkbit_cuda124.so", exact=True, warn=True,
         override='KBIT_CUDA_VERSION', risky=True,
         line='KBIT_CUDA_VERSION=12.4: using libkbit_cuda124.so although it may not run here (no cubin or PTX runs on sm_61 (GPU 0 GPU0): cubins 70,75,80,86,89,90, PTX 90)',
         whys={
             'libkbit_cuda124.so': 'taken: KBIT_CUDA_VERSION',
         }),
    Case("two-gpus-not-covered", probes("12.8", "12.8", caps=((12, 0), (12, 1), (6, 1))), manifest(lib("12.8", ptx=())),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line="GPU sm_120 (GPU0), sm_121 (GPU1), sm_61 (GPU2) are not covered by any bundled library's cubins or PTX: using the CPU library; build from source with `nox -s build -- --arch 120,121,61`",
         whys={
             'libkbit_cuda128.so': 'rejected: no cubin or PTX runs on sm_120 (GPU 0 GPU0), sm_121 (GPU 1 GPU1), sm_61 (GPU 2 GPU2): cubins 70,75,80,86,89,90, PTX -',
         }),
    Case("rocm-torch-without-a-gpu", Probes(TorchProbe(True, "2.13.0", None, "6.2", 0), DriverProbe(False)),
         manifest("12.4"), backend="cpu", file="libkbit_cpu.so",
         gpu=False,
         line='torch is a ROCm build (HIP 6.2) and kbit bundles no ROCm library: using the CPU library for CPU tensors; GPU tensors are not supported',
         whys={
             'libkbit_cuda124.so': 'rejected: torch is a ROCm build',
         }),
    Case("no-driver-without-an-error", Probes(TorchProbe(True, "2.13.0", None), DriverProbe(False)),
         manifest("12.4"), backend="cpu", file="libkbit_cpu.so",
         gpu=False,
         line='no NVIDIA driver found: using the CPU library; install the NVIDIA driver to use a GPU',
         whys={
             'libkbit_cuda124.so': 'rejected: no NVIDIA driver',
         }),
    Case("newer-same-major-without-a-known-minimum-driver", probes("12.4", "12.4"), manifest(lib("12.7")),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: 12.7): using the CPU library; update the NVIDIA driver to one supporting CUDA 12.7 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda127.so': 'rejected: CUDA 12.7 > driver CUDA 12.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs a driver for CUDA ≥ 12.7)',
         }),
    Case("uncovered-by-the-same-major-only", probes("12.4", "12.4", caps=((9, 0),)),
         manifest(lib("12.2", archs=("80",), ptx=()), lib("11.8", archs=("90",), ptx=())),
         file="libkbit_cuda118.so",
         line='using libkbit_cuda118.so: no bundled CUDA 12.4 library; cross-major: no bundled CUDA 12.x runs here; CUDA 11.8 runs ≤ driver CUDA 12.4 (legal: kbit links its CUDA runtime statically) (torch CUDA 12.4 with driver CUDA 12.4; GPUs sm_90)',
         whys={
             'libkbit_cuda118.so': 'taken: cross-major: no bundled CUDA 12.x runs here; CUDA 11.8 runs ≤ driver CUDA 12.4 (legal: kbit links its CUDA runtime statically)',
             'libkbit_cuda122.so': 'rejected: no cubin or PTX runs on sm_90 (GPU 0 GPU0): cubins 80, PTX -',
         }),
    Case("no-library-bundled", probes("12.4", "12.4"), manifest(), backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: none): using the CPU library; build from source with `nox -s build -- --cuda 12.4`',
         whys={
         }),
    # The fix names the driver that runs the lowest same-major library newer than the driver, not an
    # older-major one's, nor one the driver already runs that fails for another reason.
    Case("driver-update-for-torch-s-major", probes("12.4", "11.4"), manifest("11.8", "12.4"),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 11.4 (bundled: 11.8, 12.4): using the CPU library; update the NVIDIA driver to ≥ 550 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda118.so': 'rejected: CUDA 11.8 > driver CUDA 11.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 520)',
             'libkbit_cuda124.so': 'rejected: CUDA 12.4 > driver CUDA 11.4 (needs NVIDIA driver ≥ 550)',
         }),
    Case("driver-update-names-the-library-it-unlocks", probes("12.4", "12.4", caps=((12, 0),)),
         manifest(lib("12.4", archs=("80",), ptx=()), lib("12.8", archs=("80", "120"), ptx=())),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: 12.4, 12.8): using the CPU library; update the NVIDIA driver to ≥ 570 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda124.so': 'rejected: no cubin or PTX runs on sm_120 (GPU 0 GPU0): cubins 80, PTX -',
             'libkbit_cuda128.so': 'rejected: CUDA 12.8 > driver CUDA 12.4 and the driver branch is unknown, so minor-version compatibility is not assumed (needs NVIDIA driver ≥ 570)',
         }),
    # Only another major's library covers these GPUs: the reason names what torch's major lacks.
    Case("uncovered-by-torch-s-major", probes("12.4", "12.4", caps=((12, 0), (12, 1))),
         manifest(lib("12.4", archs=("80", "90"), ptx=()), lib("13.0", archs=("80", "120"), ptx=())),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (sm_120, sm_121 not covered) (bundled: 12.4, 13.0): using the CPU library; build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda124.so': 'rejected: no cubin or PTX runs on sm_120 (GPU 0 GPU0), sm_121 (GPU 1 GPU1): cubins 80,90, PTX -',
             'libkbit_cuda130.so': 'rejected: CUDA 13.0 > driver CUDA 12.4 (needs NVIDIA driver ≥ 580)',
         }),
    Case("no-code-at-all-for-a-gpu", probes("12.8", "12.8", caps=((9, 0),)), manifest(lib("12.8", archs=(), ptx=())),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line="GPU sm_90 (GPU0) is not covered by any bundled library's cubins or PTX: using the CPU library; build from source with `nox -s build -- --arch 90`",
         whys={
             'libkbit_cuda128.so': 'rejected: no cubin or PTX runs on sm_90 (GPU 0 GPU0): cubins -, PTX -',
         }),
    Case("ptx-only-library-too-new-for-a-gpu", probes("12.8", "12.8", caps=((7, 5),)),
         manifest(lib("12.8", archs=(), ptx=("80", "90"))), backend="cpu", file="libkbit_cpu.so", warn=True,
         line='GPU sm_75 (GPU0) is older than every bundled library (sm_80+): using the CPU library; build from source with `nox -s build -- --arch 75`',
         whys={
             'libkbit_cuda128.so': 'rejected: no cubin or PTX runs on sm_75 (GPU 0 GPU0): cubins -, PTX 80,90',
         }),
    Case("minor-compat-needs-a-cubin-of-several", probes("12.4", "12.4", caps=((12, 0),), branch=550),
         manifest(lib("12.5", archs=("80", "90"), ptx=("90",)), lib("12.6", archs=(), ptx=("90",))),
         backend="cpu", file="libkbit_cpu.so", warn=True,
         line='no bundled CUDA library runs on torch CUDA 12.4 with driver CUDA 12.4 (bundled: 12.5, 12.6): using the CPU library; update the NVIDIA driver to ≥ 555 or build from source with `nox -s build -- --cuda 12.4`',
         whys={
             'libkbit_cuda125.so': 'rejected: CUDA 12.5 > driver CUDA 12.4: minor-version compatibility needs a cubin, and sm_120 (GPU 0 GPU0) has none (cubins 80,90; PTX from CUDA 12.5 cannot be JIT-compiled by this driver)',
             'libkbit_cuda126.so': 'rejected: CUDA 12.6 > driver CUDA 12.4: minor-version compatibility needs a cubin, and sm_120 (GPU 0 GPU0) has none (cubins -; PTX from CUDA 12.6 cannot be JIT-compiled by this driver)',
         }),
    Case("cuda-version-forced-with-a-cpu-only-torch", Probes(TorchProbe(True, "2.13.0"),
         DriverProbe(True, "libcuda.so.1", None, (Device(0, "GPU0", (6, 1)),))), manifest("12.4"),
         env={"KBIT_CUDA_VERSION": "12.4"}, file="libkbit_cuda124.so", warn=True,
         override='KBIT_CUDA_VERSION', risky=True,
         line='KBIT_CUDA_VERSION=12.4: using libkbit_cuda124.so although it may not run here (no cubin or PTX runs on sm_61 (GPU 0 GPU0): cubins 70,75,80,86,89,90, PTX 90)',
         whys={
             'libkbit_cuda124.so': 'taken: KBIT_CUDA_VERSION',
         }),
    # A CPU-only torch: the driver's CUDA is the target, so a forced library of that version is exact.
    Case("cuda-version-forced-to-the-driver-s", probes(None, "12.4"), manifest("12.4", "13.0"),
         env={"KBIT_CUDA_VERSION": "124"}, file="libkbit_cuda124.so", exact=True, override="KBIT_CUDA_VERSION",
         line="KBIT_CUDA_VERSION=12.4: using libkbit_cuda124.so",
         whys={
             "libkbit_cuda124.so": "taken: KBIT_CUDA_VERSION",
             "libkbit_cuda130.so": "rejected: KBIT_CUDA_VERSION=12.4",
         }),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_select(case: Case) -> None:
    d = select(case.probes, case.manifest, case.env)
    assert (d.backend, d.file, d.exact, d.fallbacks) == (case.backend, case.file, case.exact, case.fallbacks)
    assert (d.warn, d.gpu, d.override, d.risky) == (case.warn, case.gpu, case.override, case.risky)
    assert d.reason == case.line
    assert {c.file: f"{c.verdict}: {c.why}" for c in d.candidates} == case.whys
    assert [c.file for c in d.candidates] == sorted(case.whys), "candidates are listed by file name"


BAD_ENVS = [
    ({"KBIT_BACKEND": "gpu"}, "KBIT_BACKEND='gpu' is not one of auto, cpu, cuda"),
    ({"KBIT_CUDA_VERSION": "12.3"}, "CUDA 12.3 is not bundled (bundled: 11.8, 12.4, 13.0"),
    ({"KBIT_CUDA_VERSION": "twelve"}, "KBIT_CUDA_VERSION='twelve' is not a CUDA version: use e.g. '12.4' or '124'"),
    ({"KBIT_CUDA_VERSION": "12.4", "KBIT_BACKEND": "nope"}, "KBIT_BACKEND='nope'"),
]


@pytest.mark.parametrize("env,message", BAD_ENVS, ids=[m[:20] for _, m in BAD_ENVS])
def test_bad_override_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(KbitConfigError) as info:
        select(probes("12.4", "12.4"), manifest("11.8", "12.4", "13.0"), env)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_backend_cuda_refuses_to_fall_back() -> None:
    with pytest.raises(KbitConfigError, match="KBIT_BACKEND=cuda but no NVIDIA driver found"):
        select(probes("12.4", None), manifest("12.4"), {"KBIT_BACKEND": "cuda"})


def test_bad_manifest_is_reported() -> None:
    broken = Manifest("/x/manifest.json", error="/x/manifest.json is missing: reinstall kbit")
    with pytest.raises(KbitManifestError, match="missing: reinstall kbit"):
        select(probes("12.4", "12.4"), broken, {})


@pytest.mark.parametrize(
    "archs,ptx,capability,runs",
    [
        (("80",), (), (8, 0), True),
        (("80",), (), (8, 6), True),  # a cubin runs on later minors of its major
        (("86",), (), (8, 0), False),
        (("80",), (), (9, 0), False),  # ... but not on another major
        ((), ("80",), (9, 0), True),  # PTX JIT-compiles for any later device
        ((), ("90",), (8, 9), False),
        (("90a",), (), (9, 0), True),  # arch-specific: that device only
        ((), ("90a",), (10, 0), False),
        (("100f",), (), (10, 3), True),  # family-specific: later minors of its major
        (("100f",), (), (12, 0), False),
        ((), ("100f",), (10, 3), True),  # family PTX JITs within its major ...
        ((), ("100f",), (10, 0), True),
        ((), ("100f",), (12, 0), False),  # ... never for a newer major
        ((), ("103f",), (10, 0), False),
        ((), ("100",), (12, 0), True),  # plain PTX does
        (("sm_75",), ("compute_90",), (7, 5), True),
        (("80a",), (), (8, 6), False),  # an arch-specific cubin: only its own device
        ((), ("90a",), (9, 0), True),  # arch-specific PTX: that device only
        ((), ("90a",), (9, 1), False),
        (("bogus", "80"), (), (8, 0), True),  # an arch kbit cannot read is skipped, never fatal
        ((), ("bogus", "90"), (9, 0), True),
    ],
)
def test_covers(archs: tuple[str, ...], ptx: tuple[str, ...], capability: tuple[int, int], runs: bool) -> None:
    assert covers(LibraryEntry("x.so", "cuda", CudaVersion(12, 8), archs, ptx), capability) is runs


@pytest.mark.parametrize("archs,ptx,capability,how", [
    (("70", "75", "80", "86"), ("86",), (8, 9), "cubin sm_86"),  # the closest earlier minor, as the driver loads
    (("80", "86"), (), (8, 6), "cubin sm_86"),
    (("80",), ("90",), (9, 0), "PTX compute_90"),
    (("90a",), ("90",), (9, 0), "cubin sm_90a"),
    (("80",), (), (7, 5), None),
    (("sm_80", "sm_86"), (), (8, 9), "cubin sm_86"),
    ((), ("compute_90",), (9, 0), "PTX compute_90"),
    (("80f", "86"), (), (8, 6), "cubin sm_86"),  # the closest minor, whatever its suffix
    (("86",), ("bogus", "compute_90"), (9, 0), "PTX compute_90"),
])
def test_how_covered(archs, ptx, capability, how) -> None:
    assert how_covered(LibraryEntry("x.so", "cuda", CudaVersion(12, 8), archs, ptx), capability) == how


def test_min_driver_table_rises_with_cuda() -> None:
    versions = sorted(MIN_DRIVER)
    assert [MIN_DRIVER[v] for v in versions] == sorted(MIN_DRIVER[v] for v in versions)


GOOD_CPU_SETTINGS = [
    {}, {"KBIT_NUM_THREADS": "1"}, {"KBIT_NUM_THREADS": "256"}, {"KBIT_NUM_THREADS": " 8 "}, {"KBIT_NUM_THREADS": ""},
    {"KBIT_CPU_SIMD": "0"}, {"KBIT_CPU_SIMD": "avx2"}, {"KBIT_CPU_SIMD": "avx512"}, {"KBIT_CPU_SIMD": "1"}, {"KBIT_CPU_SIMD": ""},
    {"KBIT_BACKEND": "cuda", "KBIT_CUDA_VERSION": "12.4"},
]


@pytest.mark.parametrize("env", GOOD_CPU_SETTINGS, ids=repr)
def test_check_overrides_accepts_what_the_libraries_accept(env: dict[str, str]) -> None:
    check_overrides(manifest("11.8", "12.4"), env)


BAD_CPU_SETTINGS = [
    ({"KBIT_NUM_THREADS": "0"}, "KBIT_NUM_THREADS='0' is not a thread count in [1, 256]: set one, or unset it "
                                "(the default: every CPU this process may run on)"),
    ({"KBIT_NUM_THREADS": "257"}, "KBIT_NUM_THREADS='257' is not a thread count in [1, 256]"),
    ({"KBIT_NUM_THREADS": "-1"}, "KBIT_NUM_THREADS='-1' is not a thread count"),
    ({"KBIT_NUM_THREADS": "4.0"}, "KBIT_NUM_THREADS='4.0' is not a thread count"),
    ({"KBIT_NUM_THREADS": " two"}, "KBIT_NUM_THREADS=' two' is not a thread count"),
    ({"KBIT_CPU_SIMD": "AVX2"}, "KBIT_CPU_SIMD='AVX2' is not 0 (portable loops only), avx2 (AVX2 kernels, no "
                                "AVX-512), avx512 (AVX-512 without VBMI) or 1 (every SIMD kernel the CPU has, the "
                                "default): set one, or unset it"),
    ({"KBIT_CPU_SIMD": " 1"}, "KBIT_CPU_SIMD=' 1' is not 0"),
    ({"KBIT_CPU_SIMD": "AVX512"}, "KBIT_CPU_SIMD='AVX512' is not 0"),
    ({"KBIT_BACKEND": "gpu"}, "KBIT_BACKEND='gpu' is not one of auto, cpu, cuda: set one of those, or unset it"),
    ({"KBIT_CUDA_VERSION": "12.5"}, "KBIT_CUDA_VERSION='12.5': CUDA 12.5 is not bundled (bundled: 11.8, 12.4; set "
                                    "one of those); unset it, or build from source with `nox -s build -- --cuda 12.5`"),
]


@pytest.mark.parametrize("env,message", BAD_CPU_SETTINGS, ids=repr)
def test_check_overrides_refuses_what_a_library_would_ignore(env: dict[str, str], message: str) -> None:
    with pytest.raises(KbitConfigError) as info:
        check_overrides(manifest("11.8", "12.4"), env)
    assert str(info.value).startswith(message)


def test_check_overrides_leaves_the_version_to_select_when_the_manifest_is_broken() -> None:
    broken = Manifest("/x/manifest.json", error="/x/manifest.json is missing: reinstall kbit")
    check_overrides(broken, {"KBIT_CUDA_VERSION": "12.4"})  # select() reports the manifest itself
    with pytest.raises(KbitConfigError, match="KBIT_NUM_THREADS"):
        check_overrides(broken, {"KBIT_NUM_THREADS": "x"})


def test_forced_version_with_nothing_bundled_says_so() -> None:
    with pytest.raises(KbitConfigError) as info:
        select(probes("12.4", "12.4"), manifest(), {"KBIT_CUDA_VERSION": "12.4"})
    assert str(info.value) == ("KBIT_CUDA_VERSION='12.4': CUDA 12.4 is not bundled (this kbit bundles no CUDA "
                               "library); unset it, or build from source with `nox -s build -- --cuda 12.4`")


def test_an_unparsable_forced_version_names_the_bundled_ones() -> None:
    with pytest.raises(KbitConfigError) as info:
        select(probes("12.4", "12.4"), manifest(), {"KBIT_CUDA_VERSION": "x"})
    assert str(info.value) == ("KBIT_CUDA_VERSION='x' is not a CUDA version: use e.g. '12.4' or '124' "
                               "(bundled: none), or unset it")
    assert info.value.__cause__ is None and info.value.__suppress_context__
