"""kbit's errors: one base class, one subclass per kind of failure.

Each message says what was tried and how to fix it. Each error also subclasses the builtin a caller
would naturally catch (ValueError for a bad setting, OSError for a library that will not load, ...).
"""

from __future__ import annotations

__all__ = [
    "KbitConfigError",
    "KbitError",
    "KbitLibraryError",
    "KbitLoadError",
    "KbitManifestError",
    "KbitNativeError",
    "KbitNoBackendError",
    "KbitWarning",
]


class KbitError(Exception):
    """Base class of every error kbit raises on purpose."""


class KbitConfigError(KbitError, ValueError):
    """An override in the environment (KBIT_BACKEND, KBIT_CUDA_VERSION, KBIT_LIBRARY) is invalid."""


class KbitLoadError(KbitError, RuntimeError):
    """A checkpoint does not fit the model it is loaded into (the message names the key)."""


class KbitManifestError(KbitError, OSError):
    """The package's manifest.json is missing or cannot be understood."""


class KbitLibraryError(KbitError, OSError):
    """No native library could be loaded; the message lists every library tried and why it failed."""


class KbitNoBackendError(KbitError, RuntimeError):
    """A tensor lives on a device for which no native library was chosen (the message says why)."""


class KbitNativeError(KbitError, RuntimeError):
    """A native function returned a non-zero status."""

    def __init__(self, function: str, status: int, message: str) -> None:
        super().__init__(f"{function} failed with status {status}: {message}")
        self.function = function
        self.status = status
        self.message = message


class KbitWarning(UserWarning):
    """kbit runs, but not as well as it could (a non-exact or CPU library pick, an override)."""
