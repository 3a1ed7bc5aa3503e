"""Reproducible and cached builds.

The same source built twice, in two different build directories, gives byte-identical libraries
(no build path, temp-file name, timestamp or random build id in the file: -ffile-prefix-map, nvcc's
temporaries never reach the linked library, zig's build id is a hash of the content); and a fresh
build directory compiles nothing ccache has seen, so a rebuild after a touched source is a cache hit.
And a CUDA library `nox -s build` made in its row's container is made again, byte for byte, by the
same container in a fresh build directory: what anyone can check of the wheel they were given.

Each build links with the build's own hash-locked zig (ci/requirements/zig.txt), as the wheel does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ci.kbit_ci.build_row import (
    ZIG_CACHE_MOUNT,
    ZIG_MOUNT,
    ccache_env,
    cmake_args,
    git_revision,
    source_date_epoch,
)
from ci.kbit_ci.engine import detect_engine, image_exists
from ci.kbit_ci.errors import KbitCiError
from ci.kbit_ci.images import compile_command, container_host_compiler
from ci.kbit_ci.locks import cache_dir
from ci.kbit_ci.matrix import load_matrix
from ci.kbit_ci.portable import ensure_zig, zig_cmake_args
from ci.kbit_ci.toolkits import parse_nvcc_version

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None, reason="needs cmake and ninja"
)
REVISION = "reproducible-test"


@pytest.fixture(scope="module")
def zig_args() -> list[str]:
    cache = cache_dir(os.environ, REPO)
    try:
        zig = ensure_zig(cache)
    except KbitCiError as e:  # no index to install it from (it is installed by `nox -s build`)
        pytest.skip(f"no zig: {e}")
    return zig_cmake_args(zig.exe, cache / "zig")


def _build(build: Path, args: list[str], env: dict[str, str]) -> None:
    full = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", **env}
    for cmd in (["cmake", "-S", REPO, "-B", build, "-G", "Ninja", f"-DKBIT_SOURCE_REVISION={REVISION}", *args],
                ["cmake", "--build", build, "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _assert_identical(a: Path, b: Path, tmp_path: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    assert len(da) == len(db), f"{a.name}: {len(da)} vs {len(db)} bytes"
    first = next((i for i, (x, y) in enumerate(zip(da, db)) if x != y), None)
    assert first is None, f"{a.name}: the two builds differ first at byte {first:#x}"
    assert str(tmp_path).encode() not in da, "the build directory is in the library"
    assert b"tmpxft_" not in da, "an nvcc temporary file name is in the library"


def test_cpu_library_is_byte_identical_from_two_build_dirs(tmp_path, zig_args):
    for name in ("a", "b"):
        _build(tmp_path / name, ["-DKBIT_CPU=ON", "-DKBIT_CUDA=OFF", *zig_args], {"CCACHE_DISABLE": "1"})
    _assert_identical(tmp_path / "a" / "libkbit_cpu.so", tmp_path / "b" / "libkbit_cpu.so", tmp_path)


@pytest.mark.skipif(shutil.which("ccache") is None, reason="no ccache")
def test_a_fresh_build_dir_compiles_from_the_cache(tmp_path, zig_args):
    env = ccache_env(tmp_path / "ccache", REPO)
    args = ["-DKBIT_CPU=ON", "-DKBIT_CUDA=OFF", *zig_args, "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    _build(tmp_path / "a", args, env)
    subprocess.run(["ccache", "--zero-stats"], env={**os.environ, **env}, check=True, capture_output=True)
    _build(tmp_path / "b", args, env)
    stats = subprocess.run(["ccache", "--print-stats"], env={**os.environ, **env}, check=True,
                           capture_output=True, text=True).stdout
    counters = dict(line.split("\t", 1) for line in stats.splitlines() if "\t" in line)
    hits = int(counters.get("direct_cache_hit", 0)) + int(counters.get("preprocessed_cache_hit", 0))
    misses = int(counters.get("cache_miss", 0))
    units = len(list((tmp_path / "a").rglob("*.o")))  # one per source file of libkbit_cpu.so
    assert units >= 3 and (hits, misses) == (units, 0), stats
    _assert_identical(tmp_path / "a" / "libkbit_cpu.so", tmp_path / "b" / "libkbit_cpu.so", tmp_path)


def _local_nvcc() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "bin" / "nvcc"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_local_nvcc() is None, reason="no local CUDA toolkit (CUDA_HOME or /usr/local/cuda)")
def test_cuda_library_is_byte_identical_from_two_build_dirs(tmp_path, zig_args):
    nvcc = _local_nvcc()
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    cuda, _, _ = parse_nvcc_version(out)
    row = {r.cuda: r for r in load_matrix()}.get(cuda)
    if row is None:
        pytest.skip(f"the local CUDA {cuda} has no matrix row")
    # Two of the row's archs (a cubin and the PTX) keep the two builds within seconds; what could make
    # them differ (nvcc's temporaries, the fatbinary, the link) is the same for every arch.
    archs = f"{row.archs[0]}-real;{row.ptx}-virtual"
    args = ["-DKBIT_CPU=OFF", "-DKBIT_CUDA=ON", f"-DKBIT_CUDA_ARCHS={archs}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
            *zig_args]
    for name in ("a", "b"):
        _build(tmp_path / name, args, {"CCACHE_DISABLE": "1"})
    _assert_identical(tmp_path / "a" / row.library, tmp_path / "b" / row.library, tmp_path)


STAGE = REPO / "build" / "stage"


def _staged_container_library():
    """(row, library, record) of the staged CUDA library with the fewest archs (the quickest to build
    again) that `nox -s build` made in a container; None when there is none."""
    for row in sorted(load_matrix(), key=lambda r: (len(r.archs), r.cuda)):
        lib, rec = STAGE / row.library, (STAGE / row.library).with_suffix(".json")
        if lib.is_file() and rec.is_file():
            record = json.loads(rec.read_text())
            if record["toolkit"]["source"].startswith("container:") and record["toolkit"]["image"]:
                return row, lib, record
    return None


@pytest.mark.slow
@pytest.mark.container
def test_container_built_cuda_library_is_rebuilt_byte_for_byte(tmp_path):
    engine, why = detect_engine()
    if engine is None:
        pytest.skip(f"no container engine: {why}")
    found = _staged_container_library()
    if found is None:
        pytest.skip(f"no container-built CUDA library in {STAGE}: run `nox -s build` where a container engine works")
    row, staged, record = found
    built = re.search(rb'"revision":"([^"]*)"', staged.read_bytes())
    assert built is not None, f"{staged.name} carries no revision"
    revision = built.group(1).decode()
    if revision != git_revision(REPO):
        pytest.skip(f"{staged} was built from {revision}, the tree is at {git_revision(REPO)}: run `nox -s build`")
    image = record["toolkit"]["image"]
    if not image_exists(engine, image):
        pytest.skip(f"the build image {image} of {staged.name} is gone: run `nox -s build -- --cuda {row.cuda}`")
    try:
        zig = ensure_zig(cache_dir(os.environ, REPO))
    except KbitCiError as e:
        pytest.skip(f"no zig: {e}")
    zig_cache = tmp_path / "zig-cache"
    zig_cache.mkdir()
    build = tmp_path / "build"
    build.mkdir()
    args = cmake_args(row, revision=revision, host_compiler=container_host_compiler(row),
                      extra=zig_cmake_args(f"{ZIG_MOUNT}/ziglang/zig", ZIG_CACHE_MOUNT))
    # SOURCE_DATE_EPOCH as `nox -s build` sets it: HEAD's commit time (git log -1 --format=%ct).
    # CCACHE_DISABLE: every object compiled again, none handed back by the cache.
    cmd = compile_command(
        engine, image, src=REPO, build=build, jobs=os.cpu_count() or 2,
        user=None if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}", cmake_args=args,
        mounts=[(zig.root, ZIG_MOUNT, False), (zig_cache, ZIG_CACHE_MOUNT, True)],
        env={"SOURCE_DATE_EPOCH": source_date_epoch(REPO), "CCACHE_DISABLE": "1"},
    )
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_identical(staged, build / row.library, tmp_path)
