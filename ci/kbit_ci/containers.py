"""Build images and compile a matrix row inside them, with podman or docker.

Decisions (engine flags, build args, image fingerprints, the compile command line) are pure
functions over plain data and are unit-tested; running the engine happens at the edges.

Install the engine on a fresh Debian/Ubuntu machine:

    python -m kbit_ci.containers --install-engine
    # = apt-get update && apt-get install -y podman runc debootstrap
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .errors import CommandError, ToolkitUnavailable
from .matrix import Row

__all__ = [
    "ENGINE_PACKAGES",
    "Engine",
    "base_image_for",
    "compile_command",
    "detect_engine",
    "engine_flags",
    "ensure_base_image",
    "ensure_row_image",
    "host_debian_mirror",
    "image_build_args",
    "image_fingerprint",
    "install_engine",
    "install_engine_commands",
    "parse_debian_mirror",
    "prune_images",
    "registry_host",
    "registry_reachable",
    "upstream_image_ref",
]

ENGINE_PACKAGES = ("podman", "runc", "debootstrap")
FINGERPRINT_LABEL = "org.kbit.fingerprint"
# Podman's own default ulimits; lowered to the host's hard limits where those are smaller.
_WANTED_NOFILE = 1048576
_WANTED_NPROC = 32768
_PROBE_TIMEOUT_S = 5.0
_PULL_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Engine:
    """A working container engine and the flags this host needs for it."""

    name: str  # "podman" or "docker"
    exe: str
    global_flags: tuple[str, ...] = ()  # before the subcommand: podman's --runtime
    run_flags: tuple[str, ...] = ()
    build_flags: tuple[str, ...] = ()

    def cmd(self, *args: str) -> list[str]:
        return [self.exe, *self.global_flags, *args]


# ---------------------------------------------------------------- pure decisions


def engine_flags(
    engine: str, *, runc: str | None, hard_nofile: int | None, hard_nproc: int | None
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(global flags, run flags, build flags) for `engine` on a host with these hard limits.

    Podman's default runtime (crun) fails on hybrid-cgroup hosts, so runc is named when present;
    podman's default ulimits exceed some hosts' hard limits ("setrlimit: Operation not permitted"),
    so they are capped at the hard limit; builds use the host network so RUN apt-get/pip reach the
    mirror. Docker's daemon handles all of this itself: it gets no flags.
    """
    if engine != "podman":
        return (), (), ()
    global_flags = ("--runtime", runc) if runc else ()
    limits: list[str] = []
    for name, wanted, hard in (("nofile", _WANTED_NOFILE, hard_nofile), ("nproc", _WANTED_NPROC, hard_nproc)):
        value = wanted if hard is None else min(wanted, hard)
        limits += ["--ulimit", f"{name}={value}:{value}"]
    return global_flags, tuple(limits), (*limits, "--network", "host")


def upstream_image_ref(image: str) -> str:
    """The fully qualified name of an image on Docker Hub: debian:bookworm-slim -> docker.io/library/..."""
    name = image
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return name


def parse_debian_mirror(sources: Mapping[str, str]) -> str | None:
    """The URI of Debian's main archive from apt sources files {path: text}.

    Reads deb822 `.sources` stanzas (`URIs:`) and one-line `deb URI SUITE ...` entries; skips the
    security archive, the `-updates`/`-backports` suites' own hosts are the same so they count.
    """
    for path, text in sorted(sources.items()):
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    if _is_main_debian(uri, suites):
                        return uri.rstrip("/")
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and _is_main_debian(parts[1], [parts[2]]):
                    return parts[1].rstrip("/")
    return None


_DEBIAN_SUITES = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid", "unstable", "testing", "stable")


def _is_main_debian(uri: str, suites: Sequence[str]) -> bool:
    if "security" in uri:
        return False
    return any(s.split("-")[0] in _DEBIAN_SUITES for s in suites) and "/debian" in uri


def base_image_for(row: Row) -> tuple[str, str]:
    """(image, Debian suite it is bootstrapped from) for a Debian or PyPI row."""
    if row.debian is not None:
        image = row.debian.base_image
    elif row.pypi is not None:
        image = row.pypi.base_image
    else:
        raise ToolkitUnavailable(f"CUDA {row.cuda}: no Debian base image (it only has nvidia_image)")
    m = re.fullmatch(r"(?:.*/)?debian:([a-z]+)(?:-slim)?", image)
    if not m:
        raise ToolkitUnavailable(f"CUDA {row.cuda}: cannot bootstrap {image!r}: only debian:SUITE[-slim] bases")
    return image, m.group(1)


def image_build_args(row: Row) -> dict[str, str]:
    """The --build-arg values of a row's image (they are its pins: a changed pin rebuilds)."""
    if row.dockerfile.endswith("debian.Dockerfile"):
        if row.debian is None:
            raise ToolkitUnavailable(f"CUDA {row.cuda}: {row.dockerfile} needs a [row.debian] table")
        d = row.debian
        return {
            "BASE": d.base_image,
            "SUITE": d.suite,
            "EXTRA_SUITE": d.extra_suite or "",
            "GXX": d.gxx,
            "PACKAGES": " ".join(f"{n}={v}" for n, v in sorted(d.packages.items())),
        }
    if row.dockerfile.endswith("pypi.Dockerfile"):
        if row.pypi is None:
            raise ToolkitUnavailable(f"CUDA {row.cuda}: {row.dockerfile} needs a [row.pypi] table")
        from .toolkits import pypi_lock

        return {"BASE": row.pypi.base_image, "REQUIREMENTS": " ".join(row.pypi.requirements()),
                "LOCK_SHA256": hashlib.sha256(pypi_lock(row).read_bytes()).hexdigest()}
    if row.dockerfile.endswith("nvidia.Dockerfile"):
        if not row.nvidia_image:
            raise ToolkitUnavailable(f"CUDA {row.cuda}: {row.dockerfile} needs nvidia_image")
        return {"NVIDIA_IMAGE": row.nvidia_image}
    raise ToolkitUnavailable(f"CUDA {row.cuda}: unknown dockerfile {row.dockerfile}")


def image_fingerprint(dockerfile_text: str, build_args: Mapping[str, str]) -> str:
    """A short hash of what defines an image; stored as a label to decide reuse vs rebuild."""
    h = hashlib.sha256(dockerfile_text.encode())
    for k in sorted(build_args):
        h.update(f"\0{k}={build_args[k]}".encode())
    return h.hexdigest()[:16]


def container_host_compiler(row: Row) -> str:
    """The g++ the image provides for nvcc's -ccbin."""
    if row.debian is not None and row.dockerfile.endswith("debian.Dockerfile"):
        return row.debian.gxx
    return "g++"


def compile_command(
    engine: Engine,
    image: str,
    *,
    src: Path,
    build: Path,
    cmake_args: Sequence[str],
    jobs: int,
    user: str | None,
    mounts: Sequence[tuple[Path, str, bool]] = (),
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The `podman run` line that configures and builds the CUDA library of one row.

    The source is mounted read-only; the build directory persists on the host between builds.
    `mounts` adds (host path, container path, writable) folders: the linker and the compiler cache.
    No network: the image has everything.
    """
    # ccache where the image has it (every current image does; an older one still builds, uncached).
    launchers = " ".join(f"-DCMAKE_{lang}_COMPILER_LAUNCHER=$launcher" for lang in ("C", "CXX", "CUDA"))
    script = (
        "launcher=$(command -v ccache || true); "
        f'cmake -S /src -B /build -G Ninja "$@" {launchers} && '
        f"cmake --build /build -j{jobs}"
    )
    argv = engine.cmd("run", "--rm", *engine.run_flags, "--network", "none")
    if user:
        argv += ["--user", user, "-e", "HOME=/tmp"]
    for name, value in sorted((env or {}).items()):
        argv += ["-e", f"{name}={value}"]
    argv += [
        "-v", f"{src}:/src:ro",
        "-v", f"{build}:/build",
    ]
    for host, inside, writable in mounts:
        argv += ["-v", f"{host}:{inside}" + ("" if writable else ":ro")]
    argv += [
        "-w", "/build",
        image,
        "bash", "-c", script, "kbit-build", *cmake_args,
    ]
    return argv


# ---------------------------------------------------------------- the engine


def install_engine_commands() -> list[list[str]]:
    """What CI runs on a fresh Debian/Ubuntu machine to get podman (as root)."""
    return [["apt-get", "update"], ["apt-get", "install", "-y", "-q", *ENGINE_PACKAGES]]


def install_engine() -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in install_engine_commands():
        if os.geteuid() != 0 and shutil.which("sudo"):
            cmd = ["sudo", "-E", *cmd]
        proc.run(cmd, env=env)
    detect_engine.cache_clear()


def _hard_limit(which: int) -> int | None:
    try:
        hard = resource.getrlimit(which)[1]
    except (ValueError, OSError):
        return None
    return None if hard == resource.RLIM_INFINITY else hard


def _probe_engine(name: str) -> tuple[Engine | None, str]:
    exe = shutil.which(name)
    if exe is None:
        return None, f"{name}: not installed"
    global_flags, run_flags, build_flags = engine_flags(
        name,
        runc=shutil.which("runc"),
        hard_nofile=_hard_limit(resource.RLIMIT_NOFILE),
        hard_nproc=_hard_limit(resource.RLIMIT_NPROC),
    )
    try:
        proc.run([exe, *global_flags, "info"], capture=True, quiet=True, timeout=60)
    except CommandError as e:
        return None, f"{name} info failed: {e.output.strip().splitlines()[-1:] or e}"
    return Engine(name=name, exe=exe, global_flags=global_flags, run_flags=run_flags,
                  build_flags=build_flags), ""


@functools.cache
def detect_engine() -> tuple[Engine | None, str]:
    """The first engine that really works (podman, then docker), or None and why not. Cached."""
    reasons = []
    for name in ("podman", "docker"):
        engine, why = _probe_engine(name)
        if engine is not None:
            return engine, ""
        reasons.append(why)
    return None, "; ".join(reasons) + " (fix: python -m kbit_ci.containers --install-engine)"


def _image_label(engine: Engine, image: str, label: str) -> str | None:
    """The label's value, "" if the image has none, None if there is no such image."""
    res = proc.run(
        engine.cmd("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', image),
        capture=True, quiet=True, check=False,
    )
    if res.returncode != 0:
        return None
    value = res.stdout.strip()
    return "" if value in ("", "<no value>") else value


def image_exists(engine: Engine, image: str) -> bool:
    return proc.run(engine.cmd("image", "exists", image), capture=True, quiet=True, check=False).returncode == 0 \
        if engine.name == "podman" else _image_label(engine, image, "x") is not None


# ---------------------------------------------------------------- base images


def host_debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses."""
    files: dict[str, str] = {}
    candidates = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for p in candidates:
        if p.is_file() and (p.suffix in (".sources", ".list") or p.name == "sources.list"):
            files[str(p)] = p.read_text(errors="replace")
    mirror = parse_debian_mirror(files)
    if mirror is None:
        raise ToolkitUnavailable(f"no Debian archive in {etc_apt}/sources.list[.d]: cannot bootstrap base images")
    return mirror


def registry_host(image: str) -> str:
    """The registry endpoint that serves `image` (Docker Hub's is registry-1.docker.io)."""
    host = upstream_image_ref(image).split("/", 1)[0]
    return "registry-1.docker.io" if host == "docker.io" else host


@functools.cache
def registry_reachable(host: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether an image registry answers at all (any HTTP status counts). Cached per process."""
    try:
        urllib.request.urlopen(f"https://{host}/v2/", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # 401 Unauthorized is the normal answer of /v2/
    except (urllib.error.URLError, OSError, ValueError) as e:
        proc.log(f"registry {host} does not answer ({getattr(e, 'reason', e)})")
        return False
    return True


def _pull_flags(engine: Engine) -> list[str]:
    return ["--quiet"] if engine.name == "podman" else ["-q"]


def ensure_base_image(engine: Engine, image: str, suite: str) -> str:
    """Make `image` (e.g. debian:bookworm-slim) exist locally: reuse, pull, or debootstrap it."""
    if image_exists(engine, image):
        return image
    with proc.step(f"base image {image}"):
        if registry_reachable(registry_host(image)):
            proc.run(engine.cmd("pull", *_pull_flags(engine), upstream_image_ref(image)), timeout=_PULL_TIMEOUT_S)
            proc.run(engine.cmd("tag", upstream_image_ref(image), image))
            return image
        if os.geteuid() != 0:
            raise ToolkitUnavailable(f"{image}: no registry answers and debootstrap needs root (run as root)")
        if shutil.which("debootstrap") is None:
            raise ToolkitUnavailable(f"{image}: no registry answers and debootstrap is missing "
                                     "(fix: python -m kbit_ci.containers --install-engine)")
        mirror = host_debian_mirror()
        with tempfile.TemporaryDirectory(prefix=f"kbit-{suite}-", dir=_scratch_dir()) as root:
            proc.run(["debootstrap", "--variant=minbase", suite, root, mirror])
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            try:
                proc.log(f"$ tar -C {root} -c . | {engine.exe} import - {image}")
                res = subprocess.run(engine.cmd("import", "-", image), stdin=tar.stdout, check=False,
                                     capture_output=True, text=True)
            finally:
                tar.stdout.close()  # type: ignore[union-attr]
                tar.wait()
            if res.returncode != 0 or tar.returncode != 0:
                raise CommandError(engine.cmd("import", "-", image), res.returncode, res.stdout + res.stderr)
    return image


def _scratch_dir() -> str:
    return os.environ.get("KBIT_SCRATCH_DIR") or "/var/tmp"


# ---------------------------------------------------------------- row images


def ensure_row_image(engine: Engine, row: Row, repo: Path) -> str:
    """The row's build image (kbit-build:cuXY), rebuilt only when its Dockerfile or pins changed."""
    dockerfile = repo / row.dockerfile
    args = image_build_args(row)
    fingerprint = image_fingerprint(dockerfile.read_text(), args)
    current = _image_label(engine, row.image, FINGERPRINT_LABEL)
    if current == fingerprint:
        proc.log(f"{row.image}: up to date ({FINGERPRINT_LABEL}={fingerprint})")
        return row.image
    if row.debian is None and row.pypi is None:
        if not registry_reachable(registry_host(row.nvidia_image or "")):
            raise ToolkitUnavailable(
                f"CUDA {row.cuda}: {row.nvidia_image} needs an image registry and none answers here "
                "(build this row on a CI runner with registry access)"
            )
    else:
        image, suite = base_image_for(row)
        ensure_base_image(engine, image, suite)
    cmd = engine.cmd("build", *engine.build_flags, "-f", str(dockerfile), "-t", row.image,
                     "--label", f"{FINGERPRINT_LABEL}={fingerprint}")
    for k, v in sorted(args.items()):
        cmd += ["--build-arg", f"{k}={v}"]
    cmd.append(str(_build_context(row, repo)))
    with proc.step(f"image {row.image} ({'rebuild' if current is not None else 'build'})"):
        proc.run(cmd)
    prune_images(engine)
    return row.image


def _build_context(row: Row, repo: Path) -> Path:
    """docker/ (the images need no project files), or for PyPI rows a folder holding the pinned wheels
    and their hash lock (ci/requirements/cudaXY.txt, as requirements.txt).

    The wheels are downloaded on the host, whose pip is configured for this network (index, proxy,
    CA bundle), each checked against the lock's sha256 (--require-hashes), and installed in the image
    with --no-index, checked against the same lock again: the image build needs no PyPI access.
    """
    if row.pypi is None:
        return (repo / row.dockerfile).parent
    from .toolkits import cache_dir, pypi_lock

    lock = pypi_lock(row, repo)
    ctx = cache_dir(os.environ, repo) / "images" / row.id
    wheels = ctx / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    shutil.copyfile(lock, ctx / "requirements.txt")
    with proc.step(f"wheels for {row.image}"):
        proc.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--require-hashes", "-d", wheels, "-r", lock])
    return ctx


def prune_images(engine: Engine) -> None:
    """Drop dangling layers (e.g. an image replaced by a rebuild): the images are GBs each."""
    proc.run(engine.cmd("image", "prune", "-f"), capture=True, check=False)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kbit_ci.containers")
    p.add_argument("--install-engine", action="store_true", help="apt-get install " + " ".join(ENGINE_PACKAGES))
    p.add_argument("--print-install", action="store_true", help="print the install commands and exit")
    p.add_argument("--images", nargs="*", metavar="X.Y", help="build the build images of these rows (all: none given)")
    a = p.parse_args(argv)
    if a.print_install:
        for cmd in install_engine_commands():
            print(" ".join(cmd))
        return 0
    if a.install_engine:
        install_engine()
    engine, why = detect_engine()
    if engine is None:
        print(f"no container engine works: {why}", file=sys.stderr)
        return 1
    proc.log(f"engine: {engine.exe} {' '.join(engine.run_flags)}")
    if a.images is not None:
        from .matrix import load_matrix, select_rows

        for row in select_rows(load_matrix(), a.images):
            if row.debian is None and row.pypi is None and not a.images:
                continue
            ensure_row_image(engine, row, Path(__file__).resolve().parents[2])
    return 0


if __name__ == "__main__":
    sys.exit(_main())
