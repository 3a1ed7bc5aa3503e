"""The container engine: which one works here (podman, then docker), the flags this host needs for
it, installing it, and the few image queries every other module asks it.

    detect_engine() -> (Engine | None, why not)     cached; probes `podman info`, then `docker info`
    engine_flags(...)                               the pure decision behind an Engine's flags
    install_engine()                                apt-get install podman runc debootstrap (as root)
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
from dataclasses import dataclass

from . import proc
from .errors import CommandError

__all__ = [
    "ENGINE_PACKAGES",
    "INSTALL_HINT",
    "Engine",
    "detect_engine",
    "engine_flags",
    "image_exists",
    "image_label",
    "install_engine",
    "install_engine_commands",
    "prune_images",
]

ENGINE_PACKAGES = ("podman", "runc", "debootstrap")
INSTALL_HINT = "fix: python -m ci.containers --install-engine"
# Podman's own default ulimits; lowered to the host's hard limits where those are smaller.
_WANTED_NOFILE = 1048576
_WANTED_NPROC = 32768


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
    return None, "; ".join(reasons) + f" ({INSTALL_HINT})"


def image_label(engine: Engine, image: str, label: str) -> str | None:
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
    if engine.name == "podman":
        return proc.run(engine.cmd("image", "exists", image), capture=True, quiet=True, check=False).returncode == 0
    return image_label(engine, image, "x") is not None


def prune_images(engine: Engine) -> None:
    """Drop dangling layers (e.g. an image replaced by a rebuild): the images are GBs each."""
    proc.run(engine.cmd("image", "prune", "-f"), capture=True, check=False)
