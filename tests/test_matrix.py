"""Invariants of ci/matrix.toml: the one place the CUDA build matrix lives."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kbit._versions import CudaVersion, cuda_library_name, parse_library_name

from ci.kbit_ci.matrix import MatrixError, load_matrix, select_rows

REPO = Path(__file__).resolve().parents[1]


ROWS = load_matrix()
BY_VERSION = {str(r.cuda): r for r in ROWS}


def test_rows_cover_the_supported_versions():
    versions = [str(r.cuda) for r in ROWS]
    assert versions[0] == "11.8"
    # 12.0 to 12.9 (12.7 was never released), then 13.0 onward.
    assert [v for v in versions if v.startswith("12.")] == [f"12.{m}" for m in range(10) if m != 7]
    assert "13.0" in versions


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_the_ptx_is_the_top_arch(row):
    assert row.ptx == row.archs[-1], "PTX for the top arch lets newer GPUs JIT the kernels"


def test_archs_never_shrink_within_a_major():
    """A later toolkit of the same major keeps every arch (CUDA drops archs only at a new major)."""
    for older, newer in zip(ROWS, ROWS[1:]):
        if older.cuda.major == newer.cuda.major:
            assert set(older.archs) <= set(newer.archs), f"{newer.id} drops {set(older.archs) - set(newer.archs)}"


def _local_nvcc() -> tuple[str, CudaVersion] | None:
    for nvcc in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if nvcc and Path(nvcc).is_file():
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
            m = re.search(r"release (\d+\.\d+)", out)
            if m:
                return nvcc, CudaVersion.parse(m.group(1))
    return None


def test_a_local_toolkit_compiles_every_arch_of_its_row():
    """The toolkit's own list, not a restatement: every cubin arch and the PTX arch of the row whose
    CUDA version this machine's nvcc has are in `nvcc --list-gpu-code` / `--list-gpu-arch`."""
    found = _local_nvcc()
    if found is None:
        pytest.skip("no nvcc on PATH or in /usr/local/cuda")
    nvcc, version = found
    if str(version) not in BY_VERSION:
        pytest.skip(f"nvcc {version} has no matrix row")
    row = BY_VERSION[str(version)]
    codes = set(subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split())
    archs = set(subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split())
    missing = sorted({f"sm_{a}" for a in row.archs} - codes)
    assert not missing, f"{row.id}: nvcc {version} cannot build {missing}"
    assert f"compute_{row.ptx}" in archs


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_every_row_names_a_real_toolkit_source(row):
    assert (REPO / row.dockerfile).is_file()
    assert row.debian or row.pypi or row.nvidia_image
    if row.debian:
        assert "nvidia-cuda-toolkit" in row.debian.packages
        assert row.debian.toolkit_version.startswith(f"{row.cuda}.")
        assert row.debian.gxx.startswith("g++")
    if row.pypi:
        assert set(row.pypi.packages) >= {
            "nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-cuda-cccl"
        }
        # cccl numbers its own versions (13.3.<CCCL version> for the 13.3 ... 13.5 toolkits)
        assert all(v.startswith(f"{row.cuda}.") for k, v in row.pypi.packages.items() if k != "nvidia-cuda-cccl")
        assert row.pypi.packages["nvidia-cuda-cccl"].startswith(f"{row.cuda.major}.")
    if row.nvidia_image:
        assert row.nvidia_image.startswith(f"nvidia/cuda:{row.cuda}.") and "-devel-" in row.nvidia_image


def test_host_compiler_bounds():
    assert BY_VERSION["11.8"].gcc[1] == 11, "nvcc 11.8 refuses g++ 12"
    for row in ROWS:
        lo, hi = row.gcc
        assert 9 <= lo <= hi <= 15


def test_the_reachable_rows_are_in_the_matrix():
    # The rows the Debian archive and NVIDIA's PyPI wheels serve (the ones built on machines without
    # registry access to NVIDIA's images).
    assert BY_VERSION["11.8"].debian.suite == "bookworm"
    assert BY_VERSION["12.4"].debian.suite == "trixie"
    assert BY_VERSION["12.5"].debian.extra_suite == "experimental"
    assert BY_VERSION["13.0"].pypi is not None


def test_library_names_round_trip():
    names = [r.library for r in ROWS]
    assert len(set(names)) == len(names)
    for row in ROWS:
        assert parse_library_name(row.library) == row.cuda
    assert cuda_library_name(CudaVersion(11, 8)) == "libkbit_cuda118.so"
    assert parse_library_name("libkbit_cpu.so") is None


def test_select_rows():
    assert select_rows(ROWS, []) == ROWS
    assert [r.id for r in select_rows(ROWS, ["12.4", "118"])] == ["cu124", "cu118"]
    with pytest.raises(MatrixError, match=r"CUDA 12\.7 is not in ci/matrix.toml"):
        select_rows(ROWS, ["12.7"])


def test_cmake_archs():
    row = BY_VERSION["12.4"]
    assert row.cmake_archs == "70-real;75-real;80-real;86-real;89-real;90-real;90-virtual"


def test_extra_archs_add_cubins_and_keep_the_ptx():
    from ci.kbit_ci.matrix import with_extra_archs

    (row,) = with_extra_archs(select_rows(ROWS, ["12.4"]), ["61", "sm_61"])
    assert list(row.archs) == ["61", *BY_VERSION["12.4"].archs] and row.ptx == "90"
    assert row.cmake_archs.startswith("61-real;70-real")
    assert with_extra_archs(ROWS, []) == ROWS
    with pytest.raises(MatrixError, match="compute capability"):
        with_extra_archs(ROWS, ["pascal"])
