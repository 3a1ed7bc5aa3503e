"""Compile one matrix row into its library, in the row's build container or with a host toolkit.

    build_row(row, mode="auto") -> BuiltLibrary      "auto": a container where an engine works, else host
    available_rows(rows, mode)  -> [(row, None | why not)]

Build directories persist at <repo>/build/cuda/<row.id>/ (containers) and <repo>/build/cuda/<row.id>-host/
(host toolkits; CMake caches must not mix compilers), so a rebuild with no changes is a no-op; each has a
ccache directory of the same name under <cache>/ccache/, so a rebuild in a fresh build directory, or after
a touched source, compiles nothing that was compiled before. Every library is linked by the hash-locked
zig (kbit_ci.portable): the same file on the host and, mounted read-only, in every container.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import REPO, proc
from .debian import host_debian_mirror
from .engine import detect_engine
from .errors import BuildError, CommandError, ToolkitUnavailable
from .images import compile_command, container_host_compiler, ensure_row_image
from .locks import cache_dir
from .matrix import Row
from .portable import POLICY, Zig, ensure_zig, zig_cmake_args
from .registry import registry_host, registry_reachable
from .toolkits import (
    fetchable_host_compiler,
    find_host_compiler,
    find_toolkit,
    parse_nvcc_version,
    system_toolkit,
)

__all__ = [
    "BuiltLibrary",
    "Mode",
    "available_rows",
    "build_dir",
    "build_row",
    "c_compiler_for",
    "ccache_args",
    "ccache_env",
    "cmake_args",
    "git_revision",
    "resolve_mode",
    "source_date_epoch",
]

Mode = Literal["auto", "container", "host"]


@dataclass(frozen=True)
class BuiltLibrary:
    path: Path  # <repo>/build/cuda/cu124/libkbit_cuda124.so
    row: Row
    toolkit_source: str  # "container:debian", "container:pypi", "container:nvidia", "host:system", ...
    toolkit_version: str  # exact: "12.4.131~12.4.1-2", "13.0.88"
    image: str | None
    compiler: str  # "Cuda compilation tools, release 12.4, V12.4.131"
    host_compiler: str  # "g++-13 13.3.0"
    seconds: float  # how long building it really took: a cached rebuild keeps the build's that made it
    linker: str = ""  # "zig 0.17.0 (x86_64-linux-gnu.2.28)"
    cached: bool = False  # nothing was rebuilt: the file is the one an earlier build made


# ---------------------------------------------------------------- pure decisions


def cmake_args(row: Row, *, revision: str, host_compiler: str, extra: Sequence[str] = ()) -> list[str]:
    """The configure arguments of a row's CUDA-only build (source/build dirs and generator aside)."""
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DKBIT_CPU=OFF",
        "-DKBIT_CUDA=ON",
        f"-DKBIT_CUDA_ARCHS={row.cmake_archs}",
        f"-DKBIT_SOURCE_REVISION={revision}",
        f"-DCMAKE_CUDA_HOST_COMPILER={host_compiler}",
        # The same g++ for the C/C++ parts: images may carry only g++-N (no c++/cc) and nvcc's host
        # objects must match the link.
        f"-DCMAKE_CXX_COMPILER={host_compiler}",
        f"-DCMAKE_C_COMPILER={c_compiler_for(host_compiler)}",
        *extra,
    ]


# Where the host's zig, its cache and the row's ccache directory appear inside a build container.
ZIG_MOUNT = "/opt/kbit/zig"
ZIG_CACHE_MOUNT = "/opt/kbit/zig-cache"
CCACHE_MOUNT = "/opt/kbit/ccache"


def ccache_args(enabled: bool = True) -> list[str]:
    """Compile through ccache (nvcc included: ccache knows its options); disabled, the launchers are
    cleared, so a build dir configured while ccache was installed keeps working without it."""
    return [f"-DCMAKE_{lang}_COMPILER_LAUNCHER={'ccache' if enabled else ''}" for lang in ("C", "CXX", "CUDA")]


def ccache_env(ccache_dir: str | Path, base_dir: str | Path) -> dict[str, str]:
    """ccache's settings: its directory, and paths under `base_dir` hashed as relative ones, so two build
    directories of the same source share hits (the objects carry no absolute path: -ffile-prefix-map).
    The compiler is identified by its content, not its mtime: a rebuilt image (pip-installed nvcc gets a
    new mtime) keeps its hits, a changed toolkit does not."""
    return {"CCACHE_DIR": str(ccache_dir), "CCACHE_BASEDIR": str(base_dir), "CCACHE_MAXSIZE": "2G",
            "CCACHE_COMPILERCHECK": "content"}


def c_compiler_for(gxx: str) -> str:
    """gcc-13 for g++-13, /usr/bin/gcc-12 for /usr/bin/g++-12."""
    head, _, name = gxx.rpartition("/")
    return (head + "/" if head else "") + name.replace("g++", "gcc", 1)


def build_dir(repo: Path, row: Row, mode: Literal["container", "host"]) -> Path:
    return repo / "build" / "cuda" / (row.id if mode == "container" else f"{row.id}-host")


def container_kind(row: Row) -> str:
    """Which recipe the row's image comes from: "debian", "pypi" or "nvidia"."""
    return Path(row.dockerfile).name.split(".")[0]


def resolve_mode(mode: Mode) -> Literal["container", "host"]:
    if mode == "auto":
        engine, _ = detect_engine()
        return "container" if engine is not None else "host"
    if mode not in ("container", "host"):
        raise ValueError(f"mode must be auto, container or host, not {mode!r}")
    return mode


# ---------------------------------------------------------------- availability


def _why_not_container(row: Row) -> str | None:
    engine, why = detect_engine()
    if engine is None:
        return f"no container engine: {why}"
    if container_kind(row) == "nvidia":
        host = registry_host(row.nvidia_image or "")
        if not registry_reachable(host):
            return f"{row.nvidia_image} needs the image registry {host}, which does not answer here"
        return None
    if row.debian is None and row.pypi is None:
        return "no Debian or PyPI toolkit pins for its image"
    return None


def _why_not_host(row: Row) -> str | None:
    if fetchable_host_compiler(row) is None:  # else the build fetches the row's own g++ from Debian
        try:
            find_host_compiler(row, os.environ)
        except ToolkitUnavailable as e:
            return str(e)
    if row.pypi is not None:
        return None
    if row.debian is not None:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return "Debian toolkit rows need apt-get and dpkg-deb on the host"
        try:
            host_debian_mirror()
        except ToolkitUnavailable as e:
            return str(e)
        return None
    try:  # only an installed CUDA of exactly this version can serve the row
        find_toolkit(row, providers=[("system", system_toolkit)])
    except ToolkitUnavailable as e:
        return str(e)
    return None


def unbuilt_summary(skipped: Sequence[tuple[Row, str]], mode: str = "container") -> list[str]:
    """The end of a build's log: the rows this machine did not build, grouped by why, each group with
    the one command that builds them where that reason does not hold. Pure."""
    if not skipped:
        return []
    groups: dict[str, list[Row]] = {}
    for row, why in skipped:
        if row.debian is None and row.pypi is None and row.nvidia_image:
            key = ("only NVIDIA's devel images carry their toolkits, and no image registry answers here; "
                   "on a machine whose podman or docker reaches one")
            if mode == "host":
                key = "only an installed CUDA of exactly that version serves them on a host; with it as CUDA_HOME"
        else:
            key = why
        groups.setdefault(key, []).append(row)
    lines = [f"not built here: {len(skipped)} row{'s' if len(skipped) != 1 else ''} of ci/matrix.toml"]
    for key, rows in groups.items():
        host = " --host" if mode == "host" else ""
        lines.append(f"  CUDA {', '.join(str(r.cuda) for r in rows)}: {key}:")
        lines.append(f"    nox -s build --{host} " + " ".join(f"--cuda {r.cuda}" for r in rows))
    return lines


def available_rows(rows: Sequence[Row], mode: Mode = "auto") -> list[tuple[Row, str | None]]:
    """Each row with None where this machine can build it, else the reason it cannot."""
    resolved = resolve_mode(mode)
    check = _why_not_container if resolved == "container" else _why_not_host
    return [(row, check(row)) for row in rows]


# ---------------------------------------------------------------- building


def git_revision(repo: Path) -> str:
    """The source revision compiled into kbit_build_info(): "abc123def456", "-dirty" when tracked
    files differ from HEAD, "unknown" outside a git checkout (an sdist)."""
    try:
        rev = proc.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture=True, quiet=True)
        dirty = proc.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture=True, quiet=True)
    except CommandError:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def source_date_epoch(repo: Path) -> str:
    """SOURCE_DATE_EPOCH for reproducible builds: the environment's, else HEAD's commit time, else 0."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return os.environ["SOURCE_DATE_EPOCH"]
    try:
        out = proc.run(["git", "log", "-1", "--format=%ct", "HEAD"], cwd=repo, capture=True, quiet=True)
    except CommandError:
        return "0"
    return out.stdout.strip() or "0"


def _cached_value(cache_text: str, name: str) -> str | None:
    for line in cache_text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.split(":", 1)[0] == name:
            return value
    return None


def stale_cache_reason(cache_text: str, args: Sequence[str]) -> str | None:
    """Why an existing CMakeCache.txt must not be reused for a configure with `args`, or None.

    CMake answers a changed compiler by wiping its cache and configuring again *without* the -D
    values of the command line: the re-run would quietly build without KBIT_CUDA. So a build dir
    whose cached compilers differ from the wanted ones is configured from scratch instead.
    """
    for arg in args:
        name, sep, wanted = arg.removeprefix("-D").partition("=")
        if not arg.startswith("-D") or not sep or not name.endswith("_COMPILER"):
            continue
        cached = _cached_value(cache_text, name.split(":", 1)[0])
        if cached is not None and cached != wanted and Path(cached).name != Path(wanted).name:
            return f"{name} was {cached}, now {wanted}"
    return None


def _prepare_build_dir(build: Path, row: Row, args: Sequence[str]) -> None:
    """Keep the build dir for fast rebuilds, but never let it hand back a stale library."""
    build.mkdir(parents=True, exist_ok=True)
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        why = stale_cache_reason(cache.read_text(errors="replace"), args)
        if why:
            proc.log(f"CUDA {row.cuda}: configuring {build} from scratch ({why})")
            cache.unlink()
            shutil.rmtree(build / "CMakeFiles", ignore_errors=True)
    # The output is removed first: a build that silently produced nothing cannot pass off an old file.
    (build / row.library).unlink(missing_ok=True)


def _library(row: Row, build: Path, revision: str) -> Path:
    """The freshly built library, checked: the row's archs and PTX, this revision."""
    from kbit._elf import read_elf

    lib = build / row.library
    if not lib.is_file():
        raise BuildError(f"CUDA {row.cuda}: the build finished but {lib} is missing")
    fat = read_elf(lib).fatbin
    if list(fat.cubin) != list(row.archs) or list(fat.ptx) != [row.ptx]:
        raise BuildError(
            f"CUDA {row.cuda}: {lib.name} carries cubins {list(fat.cubin)} and PTX {list(fat.ptx)}, "
            f"the matrix row says {list(row.archs)} + PTX {row.ptx}"
        )
    if f'"revision":"{revision}"'.encode() not in lib.read_bytes():
        raise BuildError(f"CUDA {row.cuda}: {lib.name} does not carry revision {revision}: a stale build")
    return lib


_PROBE = r"""
nvcc --version
echo "@@gxx $({gxx} -dumpfullversion)"
if command -v dpkg-query >/dev/null && dpkg-query -W nvidia-cuda-toolkit >/dev/null 2>&1; then
  echo "@@pkg $(dpkg-query -W -f='${{Version}}' nvidia-cuda-toolkit)"
fi
"""


def _ccache_dir(repo: Path, build: Path) -> Path:
    path = cache_dir(os.environ, repo) / "ccache" / build.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_in_container(row: Row, repo: Path, jobs: int, revision: str, zig: Zig) -> BuiltLibrary:
    engine, why = detect_engine()
    if engine is None:
        raise ToolkitUnavailable(f"no container engine works: {why}")
    t0 = time.monotonic()
    image = ensure_row_image(engine, row, repo)
    gxx = container_host_compiler(row)
    probe = proc.run(
        engine.cmd("run", "--rm", *engine.run_flags, "--network", "none", image, "bash", "-c",
                   _PROBE.format(gxx=gxx)),
        capture=True, quiet=True,
    ).stdout
    cuda, nvcc_full, nvcc_line = parse_nvcc_version(probe)
    if cuda != row.cuda:
        raise BuildError(f"{image} carries CUDA {cuda}, the row is {row.cuda}: rebuild the image")
    fields = dict(line[2:].split(" ", 1) for line in probe.splitlines() if line.startswith("@@"))
    kind = container_kind(row)
    version = fields.get("pkg") or nvcc_full
    build = build_dir(repo, row, "container")
    zig_cache = cache_dir(os.environ, repo) / "zig"
    zig_cache.mkdir(parents=True, exist_ok=True)
    args = cmake_args(row, revision=revision, host_compiler=gxx, extra=[
        *zig_cmake_args(f"{ZIG_MOUNT}/ziglang/zig", ZIG_CACHE_MOUNT)])
    _prepare_build_dir(build, row, args)
    user = None if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    cmd = compile_command(
        engine, image, src=repo, build=build, jobs=jobs, user=user, cmake_args=args,
        mounts=[(zig.root, ZIG_MOUNT, False), (zig_cache, ZIG_CACHE_MOUNT, True),
                (_ccache_dir(repo, build), CCACHE_MOUNT, True)],
        env={**ccache_env(CCACHE_MOUNT, "/src"), "SOURCE_DATE_EPOCH": source_date_epoch(repo)},
    )
    with proc.step(f"compile CUDA {row.cuda} in {image}"):
        proc.run(cmd)
    return BuiltLibrary(
        path=_library(row, build, revision), row=row, toolkit_source=f"container:{kind}", toolkit_version=version,
        image=image, compiler=nvcc_line, host_compiler=f"{gxx} {fields.get('gxx', '?')}",
        seconds=time.monotonic() - t0, linker=zig.describe(POLICY),
    )


def _build_on_host(row: Row, repo: Path, jobs: int, revision: str, zig: Zig) -> BuiltLibrary:
    t0 = time.monotonic()
    tk = find_toolkit(row)
    build = build_dir(repo, row, "host")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    launcher = ccache_args(shutil.which("ccache") is not None)
    args = cmake_args(row, revision=revision, host_compiler=tk.host_compiler.path,
                      extra=[f"-DCMAKE_CUDA_COMPILER={tk.nvcc}", *tk.cmake_args,
                             *zig_cmake_args(zig.exe, cache_dir(os.environ, repo) / "zig"), *launcher])
    _prepare_build_dir(build, row, args)
    env = {**tk.env, **ccache_env(_ccache_dir(repo, build), repo), "SOURCE_DATE_EPOCH": source_date_epoch(repo)}
    with proc.step(f"compile CUDA {row.cuda} with {tk.source} toolkit {tk.version}"):
        proc.run(["cmake", "-S", repo, "-B", build, *generator, *args], env=env)
        proc.run(["cmake", "--build", build, f"-j{jobs}"], env=env)
    return BuiltLibrary(
        path=_library(row, build, revision), row=row, toolkit_source=f"host:{tk.source}", toolkit_version=tk.version,
        image=None, compiler=tk.nvcc_version, host_compiler=str(tk.host_compiler),
        seconds=time.monotonic() - t0, linker=zig.describe(POLICY),
    )


def build_row(
    row: Row, *, mode: Mode = "auto", repo: Path = REPO, jobs: int = 2, revision: str | None = None
) -> BuiltLibrary:
    """Build the row's libkbit_cudaXY.so; raises ToolkitUnavailable, BuildError or CommandError."""
    resolved = resolve_mode(mode)
    revision = revision or git_revision(repo)
    zig = ensure_zig(cache_dir(os.environ, repo))
    if resolved == "container":
        built = _build_in_container(row, repo, jobs, revision, zig)
    else:
        built = _build_on_host(row, repo, jobs, revision, zig)
    built = _with_real_build_time(built)
    proc.log(f"CUDA {row.cuda}: {built.path} ({built.toolkit_source} {built.toolkit_version}, "
             f"{built.host_compiler}, {built.seconds:.1f} s{', cached' if built.cached else ''})")
    return built


def real_build_time(sha256: str, seconds: float, previous: dict | None) -> tuple[float, bool]:
    """(build time, cached): a library whose bytes are those the previous build made was not rebuilt,
    and its time is that build's. Pure."""
    if previous and previous.get("sha256") == sha256 and isinstance(previous.get("seconds"), (int, float)):
        return float(previous["seconds"]), True
    return seconds, False


def _with_real_build_time(built: BuiltLibrary) -> BuiltLibrary:
    """The build time a no-op rebuild reports is the one of the build that made the file, kept beside
    it (kbit-build-time.json in the row's build directory)."""
    record = built.path.parent / "kbit-build-time.json"
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = None
    sha = hashlib.sha256(built.path.read_bytes()).hexdigest()
    seconds, cached = real_build_time(sha, built.seconds, previous)
    if not cached:
        record.write_text(json.dumps({"sha256": sha, "seconds": round(seconds, 1)}) + "\n")
    return dataclasses.replace(built, seconds=seconds, cached=cached)
