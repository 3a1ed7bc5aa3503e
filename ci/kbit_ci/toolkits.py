"""CUDA toolkits on the host: a list of small providers, each `(row, cache_dir, env) -> Toolkit`.

The first provider that hits wins. A provider misses by raising Miss (or a CommandError), never by
returning None; each miss is recorded with its reason, and when every provider misses,
ToolkitUnavailable lists them all. Order:

  system  an installed CUDA of exactly the row's version (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)
  pypi    NVIDIA's 13.x wheels, pip-installed into a cached venv <cache>/toolkits/pypi-cuXY/ from the
          row's hash lock ci/requirements/cudaXY.txt (pip --require-hashes: each file checked by sha256)
  debian  Debian's non-free packages, fetched with apt-get download under a private apt configuration
          and unpacked into <cache>/toolkits/debian-cuXY/ (nothing on the system changes); apt checks
          the archive's signed Release files against Debian's keyring (signed-by) and each package's
          hash against them, and the pins fix each package's exact version

The host compiler is picked from the row's gcc bounds: the newest g++-N (or g++) on PATH within them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kbit._versions import CudaVersion

from . import proc
from .debian import apt_download, host_debian_mirror
from .errors import CommandError, ToolkitUnavailable
from .locks import cache_dir, pypi_lock
from .matrix import Row

__all__ = [
    "PROVIDERS",
    "HostCompiler",
    "Toolkit",
    "debian_toolkit",
    "find_host_compiler",
    "find_toolkit",
    "parse_nvcc_version",
    "pick_host_compiler",
    "pypi_toolkit",
    "relocated_nvcc_profile",
    "system_toolkit",
]

# Header-only packages nvcc's own headers lean on (cub/thrust/libcu++), beside the row's pins.
DEBIAN_EXTRA_PACKAGES = ("libcu++-dev", "libcub-dev", "libthrust-dev")


@dataclass(frozen=True)
class HostCompiler:
    name: str  # "g++-12": what is passed to nvcc -ccbin / CMAKE_CUDA_HOST_COMPILER
    path: str
    version: str  # "12.2.0"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit a row can be compiled with, and where it came from."""

    source: str  # "system", "pypi", "debian", "container"
    cuda: CudaVersion
    version: str  # exact: "13.0.88" (nvcc / wheel) or the Debian package version "12.4.131~12.4.1-2"
    nvcc: Path
    root: Path
    nvcc_version: str  # "Cuda compilation tools, release 13.0, V13.0.88"
    host_compiler: HostCompiler
    env: Mapping[str, str] = field(default_factory=dict)
    cmake_args: tuple[str, ...] = ()


Provider = Callable[[Row, Path, Mapping[str, str]], "Toolkit"]


class Miss(Exception):
    """A provider does not apply or failed; the message says why."""


# ---------------------------------------------------------------- pure helpers


_NVCC_RE = re.compile(r"^(Cuda compilation tools, release (\d+)\.(\d+), V(\d+\.\d+\.\d+)).*$", re.M)


def parse_nvcc_version(text: str) -> tuple[CudaVersion, str, str]:
    """(version, "13.0.88", the release line) from `nvcc --version` output."""
    m = _NVCC_RE.search(text)
    if not m:
        raise ValueError(f"no 'Cuda compilation tools, release' line in nvcc --version output: {text!r}")
    return CudaVersion(int(m.group(2)), int(m.group(3))), m.group(4), m.group(1)


def pick_host_compiler(available: Mapping[str, int], bounds: tuple[int, int]) -> str | None:
    """The newest compiler within [min, max] majors; a versioned name (g++-12) beats plain g++."""
    lo, hi = bounds
    fits = [(major, name != "g++", name) for name, major in available.items() if lo <= major <= hi]
    return max(fits)[2] if fits else None


def relocated_nvcc_profile() -> str:
    """nvcc.profile for Debian's nvcc unpacked anywhere: every path relative to the nvcc binary."""
    return (
        "# kbit: Debian's nvcc relocated (paths relative to this file's directory)\n"
        "NVVMIR_LIBRARY_DIR = $(_HERE_)/../nvvm/libdevice\n"
        "LD_LIBRARY_PATH += $(_HERE_)/../../x86_64-linux-gnu:\n"
        "PATH += $(_HERE_):$(_HERE_)/../../../bin:\n"
        "INCLUDES += -I$(_HERE_)/../../../include $(_SPACE_)\n"
        "LIBRARIES =+ $(_SPACE_) -L$(_HERE_)/../../x86_64-linux-gnu/stubs -L$(_HERE_)/../../x86_64-linux-gnu\n"
        "CUDAFE_FLAGS +=\n"
        "PTXAS_FLAGS +=\n"
    )


# ---------------------------------------------------------------- host compiler


def _compilers_on_path(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{name: (path, full version)} of every g++ / g++-N on PATH."""
    found: dict[str, tuple[str, str]] = {}
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        if not d or not os.path.isdir(d):
            continue
        for entry in sorted(os.listdir(d)):
            if re.fullmatch(r"g\+\+(-\d+)?", entry) and entry not in found:
                path = os.path.join(d, entry)
                if os.access(path, os.X_OK):
                    try:
                        ver = proc.run([path, "-dumpfullversion"], capture=True, quiet=True).stdout.strip()
                    except CommandError:
                        continue
                    found[entry] = (path, ver)
    return found


def fetchable_host_compiler(row: Row) -> str | None:
    """The g++ a Debian row's image installs (e.g. "g++-11" for 11.8), when this host could fetch it
    privately (apt-get, dpkg-deb and a Debian mirror in its sources); else None."""
    if row.debian is None or not row.debian.gxx or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    try:
        host_debian_mirror()
    except ToolkitUnavailable:
        return None
    return row.debian.gxx


def find_host_compiler(row: Row, env: Mapping[str, str], cache: Path | None = None) -> HostCompiler:
    """A g++ within the row's bounds: on PATH, else (given a cache) the one its image uses, fetched from
    Debian into the cache (nvcc 11.8 refuses the g++ 12 of Debian 12, whose archive has g++-11)."""
    found = _compilers_on_path(env)
    name = pick_host_compiler({n: int(v.split(".")[0]) for n, (_, v) in found.items()}, row.gcc)
    if name is not None:
        path, ver = found[name]
        return HostCompiler(name=name, path=path, version=ver)
    if cache is not None and fetchable_host_compiler(row):
        return debian_host_compiler(row, cache)
    have = ", ".join(f"{n} {v}" for n, (_, v) in sorted(found.items())) or "none"
    raise ToolkitUnavailable(
        f"CUDA {row.cuda} needs g++ {row.gcc[0]}..{row.gcc[1]}, PATH has {have} "
        f"(fix: apt-get install g++-{row.gcc[1]})"
    )


_SMOKE_CXX = "#include <vector>\nint main() { std::vector<int> v(3); return (int)v.size() - 3; }\n"


def debian_host_compiler(row: Row, cache: Path) -> HostCompiler:
    """The row's g++ (row.debian.gxx) from its Debian suite, unpacked into the cache: GCC finds its
    cc1plus and libstdc++ headers relative to itself, so it runs from there (checked by a compile)."""
    assert row.debian is not None and row.debian.gxx
    gxx, suite = row.debian.gxx, row.debian.suite
    n = gxx.removeprefix("g++-")
    root = cache / "toolkits" / f"{gxx}-{suite}"
    stamp = root / "kbit-toolkit.json"
    packages = [f"g++-{n}", f"gcc-{n}", f"cpp-{n}", f"libstdc++-{n}-dev", f"libgcc-{n}-dev", f"gcc-{n}-base"]
    want = {"packages": packages, "suite": suite}
    if not _stamp_ok(stamp, want):
        with proc.step(f"{gxx} from Debian {suite} into {root} (the host compiler of CUDA {row.cuda})"):
            debs = apt_download(cache, [suite], packages, cache / "debs" / f"{gxx}-{suite}", target=suite)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            for deb in debs:
                proc.run(["dpkg-deb", "-x", deb, root], quiet=True)
            stamp.write_text(json.dumps(want))
    exe = root / "usr" / "bin" / gxx
    try:
        version = proc.run([exe, "-dumpfullversion"], capture=True, quiet=True).stdout.strip()
        smoke = root / "kbit-smoke.cpp"
        smoke.write_text(_SMOKE_CXX)
        proc.run([exe, "-c", smoke, "-o", root / "kbit-smoke.o"], capture=True, quiet=True)
    except CommandError as e:
        raise ToolkitUnavailable(f"{exe} (fetched from Debian {suite}) does not compile: {e}") from None
    return HostCompiler(name=gxx, path=str(exe), version=version)


# ---------------------------------------------------------------- providers


def _nvcc_info(nvcc: Path, env: Mapping[str, str] | None = None) -> tuple[CudaVersion, str, str]:
    out = proc.run([nvcc, "--version"], capture=True, quiet=True, env=env).stdout
    return parse_nvcc_version(out)


def system_toolkit(row: Row, cache: Path, env: Mapping[str, str]) -> Toolkit:
    """An installed CUDA whose nvcc reports exactly the row's version."""
    roots: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            roots.append(Path(env[var]))
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        roots.append(Path(on_path).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    seen: list[str] = []
    for root in dict.fromkeys(r.resolve() for r in roots):
        nvcc = root / "bin" / "nvcc"
        if not nvcc.is_file():
            seen.append(f"{root}: no bin/nvcc")
            continue
        # nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc): only a real root has headers.
        if not any(root.glob("include/cuda_runtime.h")) and not any(root.glob("targets/*/include/cuda_runtime.h")):
            seen.append(f"{root}: no include/cuda_runtime.h")
            continue
        try:
            cuda, full, line = _nvcc_info(nvcc)
        except (CommandError, ValueError) as e:
            seen.append(f"{root}: {e}")
            continue
        if cuda != row.cuda:
            seen.append(f"{root}: CUDA {cuda}")
            continue
        host = find_host_compiler(row, env, cache)
        return Toolkit(
            source="system", cuda=cuda, version=full, nvcc=nvcc, root=root, nvcc_version=line,
            host_compiler=host, cmake_args=(f"-DCUDAToolkit_ROOT={root}",),
        )
    raise Miss("; ".join(seen) or "no CUDA installed")


def _stamp_ok(stamp: Path, want: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        return False


def pypi_toolkit(row: Row, cache: Path, env: Mapping[str, str]) -> Toolkit:
    """NVIDIA's PyPI wheels (13.x only: the cu11/cu12 wheels carry no nvcc) in a cached venv."""
    if row.pypi is None:
        raise Miss("the row has no [row.pypi] pins")
    try:
        lock = pypi_lock(row)
    except ToolkitUnavailable as e:
        raise Miss(str(e)) from None
    venv = cache / "toolkits" / f"pypi-{row.id}"
    stamp = venv / "kbit-toolkit.json"
    want = {"requirements": row.pypi.requirements(), "lock": lock.read_text()}
    if not _stamp_ok(stamp, want):
        with proc.step(f"CUDA {row.cuda} from PyPI into {venv}"):
            shutil.rmtree(venv, ignore_errors=True)
            proc.run([sys.executable, "-m", "venv", "--without-pip", venv])
            proc.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
                      "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", lock])
            stamp.write_text(json.dumps(want))
    roots = sorted(venv.glob(f"lib/python3*/site-packages/nvidia/cu{row.cuda.major}"))
    if not roots:
        raise Miss(f"{venv}: no site-packages/nvidia/cu{row.cuda.major} after install")
    root = roots[0]
    # nvcc.profile looks under $(TOP)/targets/x86_64-linux/{include,lib}; the wheels use $(TOP)/{include,lib}.
    target = root / "targets" / "x86_64-linux"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("include", "lib"):
        if not (target / name).exists():
            (target / name).symlink_to(Path("..", "..", name))
    if not (root / "lib64").exists():
        (root / "lib64").symlink_to("lib")
    nvcc = root / "bin" / "nvcc"
    cuda, _, line = _nvcc_info(nvcc)
    if cuda != row.cuda:
        raise Miss(f"{nvcc} is CUDA {cuda}")
    return Toolkit(
        source="pypi", cuda=cuda, version=row.pypi.toolkit_version, nvcc=nvcc, root=root, nvcc_version=line,
        host_compiler=find_host_compiler(row, env, cache), cmake_args=(f"-DCUDAToolkit_ROOT={root}",),
    )


def debian_toolkit(row: Row, cache: Path, env: Mapping[str, str]) -> Toolkit:
    """Debian's non-free toolkit packages, downloaded and unpacked privately (no root needed)."""
    if row.debian is None:
        raise Miss("the row has no [row.debian] pins")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Miss(f"{tool} not found (not a Debian-family host)")
    d = row.debian
    root = cache / "toolkits" / f"debian-{row.id}"
    stamp = root / "kbit-toolkit.json"
    want = {"packages": dict(sorted(d.packages.items())), "extra": list(DEBIAN_EXTRA_PACKAGES)}
    if not _stamp_ok(stamp, want):
        suites = [d.suite] + ([d.extra_suite] if d.extra_suite else [])
        with proc.step(f"CUDA {row.cuda} from Debian {'+'.join(suites)} into {root}"):
            wanted = [f"{n}={v}" for n, v in sorted(d.packages.items())] + list(DEBIAN_EXTRA_PACKAGES)
            debs = apt_download(cache, suites, wanted, cache / "debs" / row.id, target=d.extra_suite or d.suite)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            for deb in debs:
                proc.run(["dpkg-deb", "-x", deb, root], quiet=True)
            stamp.write_text(json.dumps(want))
    _relocate_debian_toolkit(root / "usr")
    nvcc = root / "usr" / "lib" / "nvidia-cuda-toolkit" / "bin" / "nvcc"
    if not nvcc.is_file():
        raise Miss(f"{nvcc}: missing after unpacking")
    cuda, _, line = _nvcc_info(nvcc)
    if cuda != row.cuda:
        raise Miss(f"{nvcc} is CUDA {cuda}")
    return Toolkit(
        source="debian", cuda=cuda, version=d.toolkit_version, nvcc=nvcc, root=root / "usr", nvcc_version=line,
        host_compiler=find_host_compiler(row, env, cache),
        env={"PATH": f"{root / 'usr' / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"},
        cmake_args=(f"-DCUDAToolkit_ROOT={root / 'usr'}",),
    )


def _relocate_debian_toolkit(usr: Path) -> None:
    """Make an unpacked Debian toolkit usable from where it lies, by nvcc and by CMake. Idempotent.

    nvcc.profile becomes relative to nvcc; CMake wants libdevice under a path ending in nvvm/libdevice
    (its CUDA library root) and nvlink/fatbinary beside nvcc (its toolkit root), so links put them there.
    """
    tk = usr / "lib" / "nvidia-cuda-toolkit"
    profile = tk / "bin" / "nvcc.profile"
    text = relocated_nvcc_profile()
    if profile.is_symlink() or (profile.exists() and profile.read_text() != text):
        profile.unlink()
    if not profile.exists():
        profile.write_text(text)
    links = {tk / "nvvm" / "libdevice": Path("..", "libdevice")}
    for tool in ("nvlink", "fatbinary", "ptxas", "cudafe++", "cuobjdump", "bin2c", "nvprune"):
        if (usr / "bin" / tool).exists():
            links[tk / "bin" / tool] = Path("..", "..", "..", "bin", tool)
    for link, target in links.items():
        if not link.is_symlink() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)


PROVIDERS: tuple[tuple[str, Provider], ...] = (
    ("system", system_toolkit),
    ("pypi", pypi_toolkit),
    ("debian", debian_toolkit),
)


def find_toolkit(
    row: Row,
    cache: Path | None = None,
    env: Mapping[str, str] | None = None,
    providers: Sequence[tuple[str, Provider]] = PROVIDERS,
) -> Toolkit:
    """The first provider's toolkit for `row`; ToolkitUnavailable lists why each one missed."""
    env = dict(os.environ) if env is None else env
    cache = cache_dir(env) if cache is None else cache
    misses = []
    for name, provider in providers:
        try:
            tk = provider(row, cache, env)
        except Miss as e:
            misses.append(f"{name}: {e}")
            continue
        except CommandError as e:
            misses.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        proc.log(f"CUDA {row.cuda}: toolkit {tk.source} {tk.version} at {tk.root}, host compiler {tk.host_compiler}")
        return tk
    raise ToolkitUnavailable(f"no host toolkit for CUDA {row.cuda}: " + " | ".join(misses))
