"""Loading the native libraries and calling them through ctypes.

Nothing happens at import. The CPU library is loaded on the first CPU tensor, the CUDA library on
the first CUDA tensor (that is when the driver is probed and `_policy.select` runs). Each is loaded
once, under a lock, by `cpu_library()` / `cuda_library()`, which wrap the uncached `_load()` that
tests call directly.

Every library is opened from the package directory (unless KBIT_LIBRARY names one), RTLD_LOCAL, and
checked before use: its `kbit_abi_version()` must be ABI_VERSION (the packaged kbit.h's, read by
`_abi`, which also gives every ctypes signature) and its `kbit_build_info()` must
agree with its manifest entry. A CUDA library that fails a check is skipped, with the reason, for
the next usable one.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ._abi import Abi, AbiError, load_abi
from ._elf import ElfError, check_loadable, file_sha256
from ._errors import KbitConfigError, KbitLibraryError, KbitManifestError, KbitNativeError, KbitWarning
from ._policy import Decision, check_overrides, select
from ._probes import LibraryEntry, Manifest, Probes, probe_all, probe_manifest
from ._versions import cpu_library_name

__all__ = [
    "ABI_VERSION",  # noqa: F822 (module __getattr__)
    "PACKAGE_DIR",
    "CudaLoad",
    "NativeLibrary",
    "cpu_library",
    "cuda_library",
    "open_library",
]

PACKAGE_DIR = Path(__file__).resolve().parent

logger = logging.getLogger("kbit")


def __getattr__(name: str) -> Any:
    """ABI_VERSION (kbit.h's KBIT_ABI_VERSION) and _SIGNATURES (name -> (restype, argtypes)), read from
    the packaged kbit.h on first use (`_abi`): the header is their one source."""
    if name == "ABI_VERSION":
        return _abi().version
    if name == "_SIGNATURES":
        return _abi().signatures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _abi() -> Abi:
    try:
        return load_abi()
    except AbiError as e:
        raise KbitLibraryError(f"the kbit package's ABI table is unusable: {e}") from e


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded, checked library. Every function of kbit.h is a method named without the `kbit_`
    prefix (`lib.gemv_4bit(...)` calls kbit_gemv_4bit with the header's argument count): one that
    returns a kbit_status raises KbitNativeError when it is not 0 and returns None, the others return
    their value (a static string decoded)."""

    path: str
    backend: str
    build_info: Mapping[str, Any]
    handle: Any = field(repr=False, compare=False)

    def status_string(self, status: int) -> str:
        text = self.handle.kbit_status_string(status)
        return text.decode(errors="replace") if text else f"unknown status {status}"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = None if name.startswith("_") else _abi().functions.get(f"kbit_{name}")
        if fn is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (kbit.h declares no kbit_{name})")
        native = getattr(self.handle, fn.name)

        def call(*args: Any) -> Any:
            if len(args) != len(fn.params):  # ctypes would pass extra arguments on as varargs
                raise TypeError(f"{fn.name} takes {len(fn.params)} arguments "
                                f"({', '.join(n for _, n in fn.params)}), got {len(args)}")
            result = native(*args)
            if fn.returns_status:
                if result != 0:
                    raise KbitNativeError(fn.name, result, self.status_string(result))
                return None
            return result.decode(errors="replace") if isinstance(result, bytes) else result

        call.__name__ = name
        object.__setattr__(self, name, call)  # bound once: later calls skip __getattr__
        return call


@dataclass(frozen=True)
class CudaLoad:
    """What `cuda_library()` settled on: the decision, the library (None: no CUDA library), and the
    libraries that were tried and failed, with why."""

    decision: Decision
    library: Optional[NativeLibrary]
    failures: tuple[tuple[str, str], ...] = ()

    @property
    def reason(self) -> str:
        if self.library is not None and not self.failures:
            return self.decision.reason
        tried = "; ".join(f"{f}: {why}" for f, why in self.failures)
        if self.library is not None:
            return f"using {Path(self.library.path).name} after failures ({tried}); policy: {self.decision.reason}"
        if self.failures:
            return (f"no CUDA library could be loaded ({tried}): using the CPU library; "
                    "reinstall kbit or report the failure")
        return self.decision.reason


def _mismatch(info: Mapping[str, Any], entry: LibraryEntry) -> Optional[str]:
    want = {
        "backend": entry.backend,
        "cuda": None if entry.cuda is None else str(entry.cuda),
        "archs": sorted(entry.archs),
        "ptx": sorted(entry.ptx),
    }
    got = {
        "backend": info.get("backend"),
        "cuda": info.get("cuda"),
        "archs": sorted(info.get("archs") or []),
        "ptx": sorted(info.get("ptx") or []),
    }
    diffs = [f"{k} {got[k]!r} (manifest: {want[k]!r})" for k in want if got[k] != want[k]]
    return "kbit_build_info() disagrees with the manifest: " + ", ".join(diffs) if diffs else None


def open_library(path: Path, entry: Optional[LibraryEntry]) -> NativeLibrary:
    """dlopen one library and check it. `entry=None` (KBIT_LIBRARY) skips the manifest comparison.
    Raises KbitLibraryError saying what failed."""
    if entry is not None and entry.size is not None:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise KbitLibraryError(f"{path}: {e.strerror or e}") from None
        if size != entry.size:
            raise KbitLibraryError(f"{path}: {size} bytes, the manifest says {entry.size}: the file was replaced")
    try:
        check_loadable(path)  # a truncated file would kill the process with SIGBUS inside dlopen
    except (OSError, ElfError) as e:
        raise KbitLibraryError(f"{path} cannot be loaded: {e}") from None
    if entry is not None and entry.sha256:  # the manifest writer always records one
        digest = file_sha256(path)
        if digest != entry.sha256:
            raise KbitLibraryError(f"{path}: sha256 {digest[:16]}..., the manifest says {entry.sha256[:16]}...: "
                                   "the file was replaced or corrupted; reinstall kbit")
    try:
        handle = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    except OSError as e:
        raise KbitLibraryError(f"dlopen failed: {e}") from None
    # The ABI version first: a library of another ABI may lack entry points this runtime binds, and
    # "different kbit versions" is the message that helps then.
    try:
        abi_fn = handle.kbit_abi_version
    except AttributeError as e:
        raise KbitLibraryError(f"{path}: missing symbol ({e}): not a kbit library") from None
    table = _abi()
    abi_fn.restype, abi_fn.argtypes = ctypes.c_int, []
    abi = abi_fn()
    if abi != table.version:
        raise KbitLibraryError(f"{path}: ABI {abi}, this kbit runtime needs ABI {table.version}: "
                               "the library and the Python package come from different kbit versions")
    try:
        for name, (restype, argtypes) in table.signatures().items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError as e:
        raise KbitLibraryError(f"{path}: missing symbol ({e}): not a kbit library of this version") from None
    try:
        info = json.loads((handle.kbit_build_info() or b"").decode())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise KbitLibraryError(f"{path}: kbit_build_info() is not valid JSON ({e})") from None
    if entry is not None:
        problem = _mismatch(info, entry)
        if problem:
            raise KbitLibraryError(f"{path}: {problem}")
    backend = str(info.get("backend", "unknown"))
    return NativeLibrary(str(path), backend, info, handle)


def _manifest_or_raise(package_dir: Path) -> Manifest:
    manifest = probe_manifest(package_dir)
    if not manifest.ok:
        raise KbitManifestError(manifest.error)
    return manifest


def _load_cpu(package_dir: Path, env: Mapping[str, str]) -> NativeLibrary:
    manifest = _manifest_or_raise(package_dir)
    check_overrides(manifest, env)
    name = cpu_library_name()
    entry = manifest.entry(name)
    if entry is None:
        raise KbitManifestError(f"{manifest.path} lists no {name}: reinstall kbit")
    try:
        return open_library(package_dir / name, entry)
    except KbitLibraryError as e:
        raise KbitLibraryError(f"the CPU library {name} cannot be used: {e}") from None


def _load_cuda(package_dir: Path, env: Mapping[str, str], probes: Optional[Probes]) -> CudaLoad:
    manifest = _manifest_or_raise(package_dir)
    decision = select(probes if probes is not None else probe_all(), manifest, env)
    if decision.backend != "cuda":
        return CudaLoad(decision, None)
    if decision.override == "KBIT_LIBRARY":
        path = Path(decision.file)
        if not path.is_file():
            raise KbitConfigError(f"KBIT_LIBRARY={decision.file}: no such file; point it at a built "
                                  "libkbit_cuda*.so, or unset it")
        try:
            return CudaLoad(decision, open_library(path, None))
        except KbitLibraryError as e:
            raise KbitConfigError(f"KBIT_LIBRARY={decision.file} cannot be used: {e}") from None
    failures = []
    for file in (decision.file, *decision.fallbacks):
        entry = manifest.entry(file)
        try:
            library = open_library(package_dir / file, entry)
        except KbitLibraryError as e:
            failures.append((file, str(e)))
            continue
        return CudaLoad(decision, library, tuple(failures))
    return CudaLoad(decision, None, tuple(failures))


def _load(backend: str, package_dir: Path = PACKAGE_DIR, env: Optional[Mapping[str, str]] = None,
          probes: Optional[Probes] = None) -> Any:
    """Uncached: load the library for `backend` ("cpu" -> NativeLibrary, "cuda" -> CudaLoad)."""
    env = os.environ if env is None else env
    if backend == "cpu":
        return _load_cpu(package_dir, env)
    if backend == "cuda":
        return _load_cuda(package_dir, env, probes)
    raise ValueError(f"backend must be 'cpu' or 'cuda', not {backend!r}")


_lock = threading.Lock()
_cache: dict[str, Any] = {}


def _cached(backend: str, report: Callable[[Any], None]) -> Any:
    # Double-checked: the common path takes no lock; failures are not cached, so a fixed environment
    # (or a reinstall) is picked up by the next call.
    hit = _cache.get(backend)
    if hit is not None:
        return hit
    with _lock:
        hit = _cache.get(backend)
        if hit is None:
            hit = _load(backend)
            report(hit)
            _cache[backend] = hit
    return hit


def _report_cpu(lib: NativeLibrary) -> None:
    logger.info("kbit: CPU tensors use %s", lib.path)


def _report_cuda(load: CudaLoad) -> None:
    logger.info("kbit: %s", load.reason)
    for c in load.decision.candidates:
        logger.debug("kbit: candidate %s %s: %s", c.file, c.verdict, c.why)
    if load.decision.warn or load.failures:
        warnings.warn(f"kbit: {load.reason}", KbitWarning, stacklevel=4)


def cpu_library() -> NativeLibrary:
    """The CPU library, loaded once."""
    return _cached("cpu", _report_cpu)  # type: ignore[no-any-return]


def cuda_library() -> CudaLoad:
    """The CUDA library choice, made and loaded once (`.library` is None when CUDA tensors have none)."""
    return _cached("cuda", _report_cuda)  # type: ignore[no-any-return]


def _reset_cache() -> None:
    """For tests."""
    with _lock:
        _cache.clear()
