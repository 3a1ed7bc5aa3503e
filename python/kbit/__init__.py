"""kbit: k-bit quantization kernels, one native library per CUDA version, chosen at first use.

`import kbit` is cheap and never fails: it imports neither torch nor any native library. The
library for CPU tensors is loaded on the first CPU tensor, the one for CUDA tensors on the first
CUDA tensor; `python -m kbit` shows what would be chosen and why.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import (
    KbitConfigError,
    KbitError,
    KbitLibraryError,
    KbitLoadError,
    KbitManifestError,
    KbitNativeError,
    KbitNoBackendError,
    KbitWarning,
)

__all__ = [
    "KbitConfigError",
    "KbitError",
    "KbitLibraryError",
    "KbitLoadError",
    "KbitManifestError",
    "KbitNativeError",
    "KbitNoBackendError",
    "KbitWarning",
    "__version__",
    "functional",
    "nn",
    "optim",
]


def _version() -> str:
    """The version frozen into the package at build time (kbit/_version.py, from the git tag), else the
    installed distribution's metadata, else "0+unknown" (a source checkout on sys.path)."""
    try:
        from ._version import version  # written by scikit-build-core; absent in a source checkout

        return str(version)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
    except ImportError:  # pragma: no cover
        return "0+unknown"
    try:
        return dist_version("kbit")
    except PackageNotFoundError:
        return "0+unknown"
    except Exception as e:  # broken metadata must not break import, nor hide why the version is unknown
        import warnings

        warnings.warn(f"kbit's version is unknown: reading its distribution metadata failed "
                      f"({type(e).__name__}: {e})", KbitWarning, stacklevel=3)
        return "0+unknown"


# Imported on first attribute access (each imports torch and registers kbit's torch.library ops).
_LAZY_SUBMODULES = frozenset({"functional", "nn", "optim"})


def __getattr__(name: str) -> Any:
    if name == "__version__":  # computed on first use: `import kbit` reads no file for it
        value = globals()["__version__"] = _version()
        return value
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES | {"__version__"})
