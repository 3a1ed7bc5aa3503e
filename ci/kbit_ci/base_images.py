"""The Debian base images the row images start from: reused, pulled, or bootstrapped from Debian.

Where no registry answers, `debootstrap --variant=minbase SUITE` from the host's own Debian mirror
(kbit_ci.debian) makes the image, imported with `podman import`; that needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from . import proc
from .debian import host_debian_mirror
from .engine import INSTALL_HINT, Engine, image_exists
from .errors import CommandError, ToolkitUnavailable
from .matrix import Row
from .registry import registry_host, registry_reachable, upstream_image_ref

__all__ = ["base_image_for", "ensure_base_image"]

_PULL_TIMEOUT_S = 900.0


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
            raise ToolkitUnavailable(f"{image}: no registry answers and debootstrap is missing ({INSTALL_HINT})")
        _bootstrap(engine, image, suite)
    return image


def _bootstrap(engine: Engine, image: str, suite: str) -> None:
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


def _scratch_dir() -> str:
    return os.environ.get("KBIT_SCRATCH_DIR") or "/var/tmp"
