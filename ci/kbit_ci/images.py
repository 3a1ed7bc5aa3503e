"""The build image of each matrix row (kbit-build:cuXY) and the command that compiles in it.

    image_build_args(row)               the --build-arg values: the row's pins (pure)
    image_fingerprint(text, args)       a label deciding reuse vs rebuild (pure)
    ensure_row_image(engine, row, repo) the image, rebuilt only when its Dockerfile or pins changed
    compile_command(engine, image, ...) the `podman run` line that builds a row's library (pure)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import proc
from .base_images import base_image_for, ensure_base_image
from .engine import Engine, image_label, prune_images
from .errors import ToolkitUnavailable
from .locks import cache_dir, pypi_lock
from .matrix import Row
from .registry import registry_host, registry_reachable

__all__ = [
    "FINGERPRINT_LABEL",
    "compile_command",
    "container_host_compiler",
    "ensure_row_image",
    "image_build_args",
    "image_fingerprint",
]

FINGERPRINT_LABEL = "org.kbit.fingerprint"


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


def ensure_row_image(engine: Engine, row: Row, repo: Path) -> str:
    """The row's build image (kbit-build:cuXY), rebuilt only when its Dockerfile or pins changed."""
    dockerfile = repo / row.dockerfile
    args = image_build_args(row)
    fingerprint = image_fingerprint(dockerfile.read_text(), args)
    current = image_label(engine, row.image, FINGERPRINT_LABEL)
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
    argv += ["-v", f"{src}:/src:ro", "-v", f"{build}:/build"]
    for host, inside, writable in mounts:
        argv += ["-v", f"{host}:{inside}" + ("" if writable else ":ro")]
    argv += ["-w", "/build", image, "bash", "-c", script, "kbit-build", *cmake_args]
    return argv
