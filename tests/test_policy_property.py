"""Property: the policy never picks a library a device cannot run, and picks one whenever one runs.

The oracle below is written from CUDA's compatibility rules, not from the policy's helpers:
  * a cubin sm_XY runs on sm_XZ for Z >= Y, same major only; sm_XYa only on sm_XY; sm_XYf like sm_XY;
  * PTX compute_XY JIT-compiles for any device >= XY (compute_XYa only for XY), if the driver's CUDA
    version is at least the library's;
  * a library built with CUDA X.Y runs on a driver of CUDA >= X.Y; on an older driver of major X only
    by minor-version compatibility: a known driver branch >= the major's floor and a cubin per device.
"""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from kbit._drivers import MINOR_COMPAT_FLOOR
from kbit._policy import select
from kbit._probes import Device, DriverProbe, LibraryEntry, Manifest, Probes, TorchProbe
from kbit._versions import CudaVersion, cuda_library_name

VERSIONS = [(11, 0), (11, 4), (11, 8), (12, 0), (12, 2), (12, 4), (12, 5), (12, 6), (12, 8), (12, 9),
            (13, 0), (13, 1)]
ARCHS = ["50", "60", "61", "70", "75", "80", "86", "89", "90", "90a", "100", "100a", "100f", "103", "120",
         "120a", "121"]
CAPS = [(5, 0), (6, 0), (6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)]
BRANCHES = [None, 440, 450, 470, 520, 525, 550, 570, 580, 590]


def _split(arch: str) -> tuple[int, int, str]:
    suffix = arch[-1] if arch[-1] in "af" else ""
    digits = arch[:-1] if suffix else arch
    return int(digits[:-1]), int(digits[-1]), suffix


def cubin_runs(arch: str, cap: tuple[int, int]) -> bool:
    major, minor, suffix = _split(arch)
    if suffix == "a":
        return (major, minor) == cap
    return major == cap[0] and minor <= cap[1]


def ptx_runs(arch: str, cap: tuple[int, int]) -> bool:
    major, minor, suffix = _split(arch)
    if suffix == "a":
        return (major, minor) == cap
    if suffix == "f":  # family-specific: its major only
        return major == cap[0] and minor <= cap[1]
    return (major, minor) <= cap


def runs(lib: tuple[int, int], archs: list[str], ptx: list[str], driver: tuple[int, int],
         branch: Optional[int], caps: list[tuple[int, int]]) -> bool:
    has_cubin = all(any(cubin_runs(a, c) for a in archs) for c in caps)
    if lib <= driver:
        return all(any(cubin_runs(a, c) for a in archs) or any(ptx_runs(p, c) for p in ptx) for c in caps)
    if lib[0] == driver[0] and branch is not None and branch >= MINOR_COMPAT_FLOOR[lib[0]]:
        return has_cubin
    return False


libraries = st.dictionaries(
    st.sampled_from(VERSIONS),
    st.tuples(st.lists(st.sampled_from(ARCHS), max_size=5, unique=True),
              st.lists(st.sampled_from(ARCHS), max_size=2, unique=True)),
    max_size=4,
)


@settings(max_examples=400, deadline=None)
@given(
    libs=libraries,
    driver=st.sampled_from(VERSIONS),
    branch=st.sampled_from(BRANCHES),
    caps=st.lists(st.sampled_from(CAPS), min_size=1, max_size=3),
    torch_cuda=st.one_of(st.none(), st.sampled_from(VERSIONS)),
)
def test_never_picks_what_cannot_run(libs: dict, driver: tuple[int, int], branch: Optional[int],
                                     caps: list[tuple[int, int]], torch_cuda: Optional[tuple[int, int]]) -> None:
    entries = tuple(
        LibraryEntry(cuda_library_name(CudaVersion(*v)), "cuda", CudaVersion(*v), tuple(a), tuple(p))
        for v, (a, p) in libs.items()
    )
    manifest = Manifest("manifest.json", (LibraryEntry("libkbit_cpu.so", "cpu", None, (), ()), *entries), "0", 1)
    probes = Probes(
        TorchProbe(True, "2.13.0", CudaVersion(*torch_cuda) if torch_cuda else None, None, len(caps)),
        DriverProbe(True, "libcuda.so.1", CudaVersion(*driver),
                    tuple(Device(i, f"GPU{i}", c) for i, c in enumerate(caps)), None, branch),
    )
    d = select(probes, manifest, {})
    runnable = {cuda_library_name(CudaVersion(*v)) for v, (a, p) in libs.items()
                if runs(v, a, p, driver, branch, caps)}
    assert "\n" not in d.reason
    if d.backend == "cuda":
        assert d.file in runnable, d.reason
        assert set(d.fallbacks) <= runnable
        assert set(d.fallbacks) | {d.file} == runnable  # every runnable one is tried
        target = torch_cuda or driver
        chosen = next(v for v in libs if cuda_library_name(CudaVersion(*v)) == d.file)
        same_major = [v for v in libs if v[0] == target[0] and cuda_library_name(CudaVersion(*v)) in runnable]
        if same_major:
            assert chosen[0] == target[0], d.reason  # torch's (else the driver's) major first
        else:
            assert "cross-major" in d.reason
        if target in same_major:
            assert chosen == target
        assert d.exact == (chosen == target)
    else:
        assert not runnable, d.reason
