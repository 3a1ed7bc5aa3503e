"""One error base class for the build tooling; each subclass says what was tried and how to fix it."""

from __future__ import annotations

__all__ = ["BuildError", "CommandError", "KbitCiError", "ToolkitUnavailable"]


class KbitCiError(Exception):
    """Base of every error the build tooling raises on purpose."""


class CommandError(KbitCiError):
    """A subprocess failed. Carries the command, its exit status and the tail of its output."""

    def __init__(self, cmd: list[str], returncode: int, output: str = "") -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-40:])
        super().__init__(
            f"command failed with exit status {returncode}: {' '.join(cmd)}" + (f"\n{tail}" if tail else "")
        )


class ToolkitUnavailable(KbitCiError):
    """No way to get the toolkit a matrix row needs on this machine (the message says why)."""


class BuildError(KbitCiError):
    """A library could not be built or does not look like the matrix row says it should."""
