"""The one helper every subprocess of the build goes through: echo, run, check, raise with output."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CommandError

__all__ = ["log", "run", "step"]


def log(message: str) -> None:
    print(f"[kbit] {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
    quiet: bool = False,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, echoing it first (unless quiet).

    With capture=False the output streams to the terminal (long steps show their own progress);
    with capture=True it is returned, and included in the CommandError if the command fails.
    `env` entries are added to the current environment.
    """
    argv = [os.fspath(c) for c in cmd]
    if not quiet:
        log("$ " + shlex.join(argv))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=full_env,
            text=True,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: not found ({e})") from None
    except subprocess.TimeoutExpired as e:
        out = e.output.decode() if isinstance(e.output, bytes) else (e.output or "")
        raise CommandError(argv, 124, f"timed out after {timeout} s\n{out}") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout or "")
    return proc


class step:
    """A named, timed step of a long build: `with step("build image cu124"): ...`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seconds = 0.0

    def __enter__(self) -> step:
        self._t0 = time.monotonic()
        log(f"==> {self.name}")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.seconds = time.monotonic() - self._t0
        status = "done" if exc_type is None else "FAILED"
        log(f"<== {self.name}: {status} in {self.seconds:.1f} s")
