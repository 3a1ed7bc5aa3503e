"""Which bundled CUDA library to use: a pure function of the probes, the manifest and the environment.

`select()` does no I/O; the loader passes it what the probes found and `os.environ`. Rules, in order
of precedence:

  1. `KBIT_LIBRARY=/path/to/lib.so`: that file, no checks (warned).
  2. `KBIT_BACKEND=cpu`: the CPU library only. (`cuda` forbids falling back to the CPU; `auto`, the
     default, lets the rules below decide.)
  3. `KBIT_CUDA_VERSION=12.4` (or `124`): that bundled library; one not bundled is an error.
  4. Automatic. The target is torch's CUDA version, or the driver's when torch has no CUDA. A library
     built with CUDA X.Y runs when every visible device can run its code and either
       * the driver's CUDA version is ≥ X.Y: a cubin sm_XY covers sm_XZ (Z ≥ Y, same major; `a`
         archs only sm_XY itself) and PTX compute_XY covers any device ≥ XY (JIT); or
       * minor-version compatibility: the driver is of major X, its branch is at least
         MINOR_COMPAT_FLOOR[X], and every device has a cubin (PTX from a newer toolkit cannot be
         JIT-compiled by an older driver). When the probe cannot read the branch (e.g. WSL's
         unversioned libcuda.so.1) this path is not taken: unknown is treated as too old.
     Preference: the target's exact version, then the same major's highest version the driver runs
     natively, then its lowest version above the driver that runs by minor-version compatibility,
     then other majors (legal, since the CUDA runtime is linked statically; said in the reason).
     The rest are fallbacks the loader tries in order if the first will not load. With none usable,
     CUDA tensors have no library, and the one-line reason says why and how to fix it.

Bad override values raise `KbitConfigError`; the loader calls `select()` at first native use only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Optional

from ._drivers import MIN_DRIVER, MINOR_COMPAT_FLOOR
from ._errors import KbitConfigError, KbitManifestError
from ._probes import Device, DriverProbe, LibraryEntry, Manifest, Probes
from ._versions import CudaVersion, cpu_library_name

__all__ = [
    "BACKENDS",
    "MINOR_COMPAT_FLOOR",
    "MIN_DRIVER",
    "Candidate",
    "Decision",
    "check_overrides",
    "covers",
    "how_covered",
    "select",
]

BACKENDS = ("auto", "cpu", "cuda")

_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(\d)([af]?)$")


@dataclass(frozen=True)
class Candidate:
    file: str
    verdict: str
    """"taken" or "rejected"."""
    why: str


@dataclass(frozen=True)
class Decision:
    backend: str
    """"cuda" when CUDA tensors get a CUDA library, else "cpu" (CUDA tensors are refused)."""
    file: str
    """The chosen library: a file in the package directory, or KBIT_LIBRARY's path."""
    exact: bool
    """The library's CUDA version is the target's (torch's, else the driver's)."""
    reason: str
    """One line: what was chosen and why, or why nothing could be, with the fix."""
    candidates: tuple[Candidate, ...] = ()
    fallbacks: tuple[str, ...] = ()
    """Usable libraries to try, in order, if `file` does not load."""
    override: Optional[str] = None
    """The environment variable that made this decision, if any."""
    gpu: bool = False
    """A CUDA device is visible."""
    risky: bool = False
    """KBIT_CUDA_VERSION forced a library the checks say may not run here."""

    @property
    def warn(self) -> bool:
        """Worth one warning: the user loses something (a GPU is there, but CPU tensors' library is what
        GPU tensors get: none) or bypassed the checks (KBIT_LIBRARY, or a KBIT_CUDA_VERSION that may not
        run here). Every other pick, exact or not, is right and quiet: logged at INFO on logger kbit and
        shown by `python -m kbit`."""
        if self.override == "KBIT_LIBRARY" or self.risky:
            return True
        if self.override == "KBIT_BACKEND":
            return False  # asked for explicitly
        return self.backend == "cpu" and self.gpu


def _parse_arch(arch: str) -> Optional[tuple[int, int, str]]:
    m = _ARCH_RE.match(arch.strip())
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def how_covered(entry: LibraryEntry, capability: tuple[int, int]) -> Optional[str]:
    """How the library runs on a device of this compute capability: "cubin sm_80", "PTX compute_90"
    (JIT-compiled by the driver), or None.

    A cubin sm_XY runs on sm_XZ, Z >= Y (same major); an arch-specific cubin sm_XYa only on sm_XY; a
    family-specific sm_XYf on the later minors of its major. PTX compute_XY is JIT-compiled by the
    driver for any device >= XY; compute_XYa only for XY; compute_XYf only within its major (the
    family: compute_100f runs on 10.0 and 10.3, never on 12.0). A cubin is preferred to PTX.
    """
    major, minor = capability
    cubins = [(p[1], arch) for arch in entry.archs if (p := _parse_arch(arch))
              and p[0] == major and (p[1] == minor if p[2] == "a" else p[1] <= minor)]
    if cubins:  # the driver loads the closest: the highest minor at or below the device's
        return f"cubin sm_{max(cubins)[1].removeprefix('sm_')}"
    for arch in entry.ptx:
        p = _parse_arch(arch)
        if not p:
            continue
        if p[2] == "a":
            ok = (p[0], p[1]) == capability
        elif p[2] == "f":
            ok = p[0] == major and p[1] <= minor
        else:
            ok = (p[0], p[1]) <= capability
        if ok:
            return f"PTX compute_{arch.removeprefix('compute_')}"
    return None


def covers(entry: LibraryEntry, capability: tuple[int, int]) -> bool:
    """Can the library run on a device of this compute capability? (how_covered)"""
    return how_covered(entry, capability) is not None


def _devices(probes: Probes) -> tuple[Device, ...]:
    if probes.driver.devices:
        return probes.driver.devices
    # Without the driver's list, torch's capabilities (known only once it initialised CUDA).
    return tuple(Device(i, "", cap) for i, cap in enumerate(probes.torch.capabilities))


def _list(versions: list[CudaVersion]) -> str:
    return ", ".join(str(v) for v in versions) or "none"


def _driver_hint(version: CudaVersion) -> str:
    branch = MIN_DRIVER.get(version)
    return f"NVIDIA driver ≥ {branch}" if branch else f"a driver for CUDA ≥ {version}"


def _cubin_covers(entry: LibraryEntry, capability: tuple[int, int]) -> bool:
    return covers(replace(entry, ptx=()), capability)


def _names(devices: list[Device]) -> str:
    return ", ".join(f"{d.sm} (GPU {d.index}{' ' + d.name if d.name else ''})" for d in devices)


def _by_compat(entry: LibraryEntry, driver: Optional[CudaVersion]) -> bool:
    """Built with a newer CUDA than the driver's: it can run only by minor-version compatibility."""
    return driver is not None and entry.cuda is not None and entry.cuda > driver


def _check(entry: LibraryEntry, driver: Optional[CudaVersion], branch: Optional[int],
           devices: tuple[Device, ...]) -> Optional[str]:
    """Why the library cannot run here, or None."""
    assert entry.cuda is not None
    if _by_compat(entry, driver):
        assert driver is not None
        needs = f"needs {_driver_hint(entry.cuda)}"
        if entry.cuda.major != driver.major:
            return f"CUDA {entry.cuda} > driver CUDA {driver} ({needs})"
        floor = MINOR_COMPAT_FLOOR.get(entry.cuda.major)
        if branch is None or floor is None:
            return (f"CUDA {entry.cuda} > driver CUDA {driver} and the driver branch is unknown, so minor-version "
                    f"compatibility is not assumed ({needs})")
        if branch < floor:
            return (f"CUDA {entry.cuda} > driver CUDA {driver} and driver {branch} is below the CUDA "
                    f"{entry.cuda.major}.x minor-version compatibility floor {floor} ({needs})")
        missing = [d for d in devices if not _cubin_covers(entry, d.capability)]
        if missing:
            return (f"CUDA {entry.cuda} > driver CUDA {driver}: minor-version compatibility needs a cubin, and "
                    f"{_names(missing)} has none (cubins {','.join(entry.archs) or '-'}; PTX from CUDA "
                    f"{entry.cuda} cannot be JIT-compiled by this driver)")
        return None
    missing = [d for d in devices if not covers(entry, d.capability)]
    if missing:
        have = ",".join(entry.archs) or "-"
        ptx = ",".join(entry.ptx) or "-"
        return f"no cubin or PTX runs on {_names(missing)}: cubins {have}, PTX {ptx}"
    return None


def _reject_all(entries: tuple[LibraryEntry, ...], why: str) -> tuple[Candidate, ...]:
    return tuple(Candidate(e.file, "rejected", why) for e in entries)


def _backend(env: Mapping[str, str]) -> str:
    value = env.get("KBIT_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise KbitConfigError(
            f"KBIT_BACKEND={env['KBIT_BACKEND']!r} is not one of {', '.join(BACKENDS)}: "
            "set one of those, or unset it"
        )
    return value


def _forced_version(env: Mapping[str, str], bundled: list[CudaVersion]) -> Optional[CudaVersion]:
    text = env.get("KBIT_CUDA_VERSION", "").strip()
    if not text:
        return None
    try:
        version = CudaVersion.parse(text)
    except ValueError:
        raise KbitConfigError(
            f"KBIT_CUDA_VERSION={text!r} is not a CUDA version: use e.g. '12.4' or '124' "
            f"(bundled: {_list(bundled)}), or unset it"
        ) from None
    if version not in bundled:
        choices = f"bundled: {_list(bundled)}; set one of those" if bundled else "this kbit bundles no CUDA library"
        raise KbitConfigError(
            f"KBIT_CUDA_VERSION={text!r}: CUDA {version} is not bundled ({choices}); "
            f"unset it, or build from source with `nox -s build -- --cuda {version}`"
        )
    return version


MAX_CPU_THREADS = 256
"""The CPU library's thread cap (csrc/cpu/parallel.cpp's kMaxThreads)."""


def _cpu_settings(env: Mapping[str, str]) -> None:
    """KBIT_NUM_THREADS (a count in [1, 256]) and KBIT_CPU_SIMD ("0", "avx2", "avx512" or "1"), which the CPU library
    reads itself; a value it would silently ignore is a KbitConfigError here."""
    threads = env.get("KBIT_NUM_THREADS", "").strip()
    if threads and not (threads.isdigit() and 1 <= int(threads) <= MAX_CPU_THREADS):
        raise KbitConfigError(f"KBIT_NUM_THREADS={env['KBIT_NUM_THREADS']!r} is not a thread count in "
                              f"[1, {MAX_CPU_THREADS}]: set one, or unset it (the default: every CPU this "
                              "process may run on)")
    simd = env.get("KBIT_CPU_SIMD")
    if simd and simd not in ("0", "avx2", "avx512", "1"):  # exactly as the library compares them
        raise KbitConfigError(f"KBIT_CPU_SIMD={simd!r} is not 0 (portable loops only), avx2 (AVX2 kernels, "
                              "no AVX-512), avx512 (AVX-512 without VBMI) or 1 (every SIMD kernel the CPU has, "
                              "the default): set one, or unset it")


def check_overrides(manifest: Manifest, env: Mapping[str, str]) -> None:
    """Raise KbitConfigError for a bad KBIT_BACKEND, KBIT_CUDA_VERSION, KBIT_NUM_THREADS or
    KBIT_CPU_SIMD: the CPU library's first use checks them, so a typo is reported even by a program
    that never touches a GPU."""
    _backend(env)
    _cpu_settings(env)
    if manifest.ok:
        _forced_version(env, [e.cuda for e in manifest.cuda_libraries if e.cuda is not None])


def select(probes: Probes, manifest: Manifest, env: Mapping[str, str]) -> Decision:
    """Choose the library for CUDA tensors. Raises KbitConfigError for a bad override value and
    KbitManifestError for an unusable manifest (both only when called, i.e. at first native use)."""
    backend = _backend(env)
    library = env.get("KBIT_LIBRARY", "").strip()
    if not manifest.ok:
        raise KbitManifestError(manifest.error)
    entries = manifest.cuda_libraries
    forced = _forced_version(env, [e.cuda for e in entries if e.cuda is not None])
    devices = _devices(probes)
    gpu = bool(devices) or bool(probes.torch.device_count)
    cpu = cpu_library_name()

    if library:
        return Decision(
            "cuda", library, False,
            f"KBIT_LIBRARY={library}: using that library without checking it fits this machine",
            _reject_all(entries, "KBIT_LIBRARY is set"), override="KBIT_LIBRARY", gpu=gpu,
        )
    if backend == "cpu":
        return Decision("cpu", cpu, False, "KBIT_BACKEND=cpu: using the CPU library only",
                        _reject_all(entries, "KBIT_BACKEND=cpu"), override="KBIT_BACKEND", gpu=gpu)
    if forced is not None:
        return _forced_decision(probes, entries, forced, devices, gpu)
    fallback = _without_gpu(probes, devices, entries)
    if fallback is None:
        fallback = _ranked_decision(probes, entries, devices, gpu)
    if isinstance(fallback, Decision):
        return fallback
    reason, candidates = fallback
    if backend == "cuda":
        raise KbitConfigError(f"KBIT_BACKEND=cuda but {reason}")
    return Decision("cpu", cpu, False, reason, candidates, gpu=gpu)


_CpuFallback = tuple[str, tuple[Candidate, ...]]
"""Why CUDA tensors get no library (one line, with the fix), and each library's verdict."""


def _target(probes: Probes) -> Optional[CudaVersion]:
    """The CUDA version a library should match: torch's, else the driver's (None when neither is known)."""
    return probes.torch.cuda if probes.torch.cuda is not None else probes.driver.version


def _forced_decision(probes: Probes, entries: tuple[LibraryEntry, ...], forced: CudaVersion,
                     devices: tuple[Device, ...], gpu: bool) -> Decision:
    """KBIT_CUDA_VERSION: that library, with a warning when the checks say it may not run here."""
    driver = probes.driver
    entry = next(e for e in entries if e.cuda == forced)
    problem = _check(entry, driver.version, driver.branch, devices)
    reason = f"KBIT_CUDA_VERSION={forced}: using {entry.file}"
    if problem:
        reason += f" although it may not run here ({problem})"
    candidates = tuple(
        Candidate(e.file, "taken", "KBIT_CUDA_VERSION") if e is entry
        else Candidate(e.file, "rejected", f"KBIT_CUDA_VERSION={forced}")
        for e in entries
    )
    target = _target(probes)
    return Decision("cuda", entry.file, forced == target, reason, candidates,
                    override="KBIT_CUDA_VERSION", gpu=gpu, risky=problem is not None)


def _without_gpu(probes: Probes, devices: tuple[Device, ...],
                 entries: tuple[LibraryEntry, ...]) -> Optional[_CpuFallback]:
    """The CPU fallback when there is no CUDA GPU to judge libraries for (ROCm torch, no driver, no
    device), or None."""
    torch, driver = probes.torch, probes.driver
    if torch.hip is not None:
        return (f"torch is a ROCm build (HIP {torch.hip}) and kbit bundles no ROCm library: "
                "using the CPU library for CPU tensors; GPU tensors are not supported",
                _reject_all(entries, "torch is a ROCm build"))
    if not driver.found:
        why = f" ({driver.error})" if driver.error else ""
        return (f"no NVIDIA driver found{why}: using the CPU library; install the NVIDIA driver to use a GPU",
                _reject_all(entries, "no NVIDIA driver"))
    if not devices:
        if driver.error:
            return (f"the NVIDIA driver reports no usable device ({driver.error}): "
                    "using the CPU library; check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
                    _reject_all(entries, "no usable CUDA device"))
        return ("no CUDA device is visible: using the CPU library; check CUDA_VISIBLE_DEVICES and nvidia-smi",
                _reject_all(entries, "no CUDA device visible"))
    return None


def _rank(entries: tuple[LibraryEntry, ...], target: CudaVersion, via_compat: set[str],
          rejected: Mapping[str, str]) -> list[LibraryEntry]:
    """The usable libraries, best first. Torch's major first: its exact version, then the highest the
    driver runs natively, then the lowest above the driver by minor-version compatibility; then other
    majors (native first, highest first)."""
    usable = [e for e in entries if e.file not in rejected]
    same = [e for e in usable if e.cuda is not None and e.cuda.major == target.major]
    return (
        [e for e in same if e.cuda == target]
        + sorted((e for e in same if e.cuda != target and e.file not in via_compat),
                 key=lambda e: e.cuda, reverse=True)  # type: ignore[arg-type,return-value]
        + sorted((e for e in same if e.cuda != target and e.file in via_compat),
                 key=lambda e: e.cuda)  # type: ignore[arg-type,return-value]
        + sorted((e for e in usable if e not in same),
                 key=lambda e: (e.file not in via_compat, e.cuda), reverse=True)  # type: ignore[arg-type,return-value]
    )


def _ranked_decision(probes: Probes, entries: tuple[LibraryEntry, ...], devices: tuple[Device, ...],
                     gpu: bool) -> Decision | _CpuFallback:
    """Every library judged for the visible GPUs; the best usable one, or why there is none."""
    torch, driver = probes.torch, probes.driver
    target = _target(probes)
    assert target is not None  # the driver was found with devices, so its version is known
    rejected = {e.file: p for e in entries if (p := _check(e, driver.version, driver.branch, devices)) is not None}
    via_compat = {e.file for e in entries if e.file not in rejected and _by_compat(e, driver.version)}
    order = _rank(entries, target, via_compat, rejected)
    context = (f"torch CUDA {torch.cuda} with driver CUDA {driver.version}" if torch.cuda is not None
               else f"driver CUDA {driver.version}")
    if not order:
        return (_no_library_reason(entries, target, context, driver.version, devices),
                tuple(Candidate(e.file, "rejected", rejected[e.file]) for e in entries))
    chosen = order[0]
    why = _why_chosen(chosen, target, "torch" if torch.cuda is not None else "the driver", driver, via_compat)
    candidates = tuple(
        Candidate(e.file, "taken", why) if e is chosen
        else Candidate(e.file, "rejected", rejected.get(e.file, f"usable, but {chosen.file} is preferred (a fallback)"))
        for e in entries
    )
    assert chosen.cuda is not None
    gpus = ", ".join(sorted({d.sm for d in devices}))
    if chosen.cuda == target:
        reason = f"using {chosen.file}: {why} ({context}; GPUs {gpus})"
    elif chosen.cuda.major == target.major and chosen.file not in via_compat:
        reason = (f"using {chosen.file}: no bundled CUDA {target} library, CUDA {chosen.cuda} is the highest "
                  f"bundled {target.major}.x that runs on {context} (GPUs {gpus})")
    else:
        reason = f"using {chosen.file}: no bundled CUDA {target} library; {why} ({context}; GPUs {gpus})"
    return Decision("cuda", chosen.file, chosen.cuda == target, reason, candidates,
                    tuple(e.file for e in order[1:]), gpu=gpu)


def _why_chosen(chosen: LibraryEntry, target: CudaVersion, whose: str, driver: DriverProbe,
                via_compat: set[str]) -> str:
    """The chosen library's verdict: an exact match, the same major's best, or another major's."""
    assert chosen.cuda is not None
    branch = f"driver {driver.branch}"  # known: minor-version compatibility is never assumed without it
    if chosen.cuda == target:
        why = f"exact match of {whose}'s CUDA {target}"
        if chosen.file in via_compat:
            why += (f", run by minor-version compatibility (driver CUDA {driver.version}, {branch} ≥ "
                    f"{MINOR_COMPAT_FLOOR[chosen.cuda.major]}, every GPU has a cubin)")
        return why
    if chosen.cuda.major != target.major:
        how = ("by minor-version compatibility" if chosen.file in via_compat
               else f"≤ driver CUDA {driver.version}")
        return (f"cross-major: no bundled CUDA {target.major}.x runs here; CUDA {chosen.cuda} runs {how} "
                f"(legal: kbit links its CUDA runtime statically)")
    if chosen.file in via_compat:
        return (f"minor-version compatibility: CUDA {chosen.cuda} > driver CUDA {driver.version}, {branch} ≥ "
                f"{MINOR_COMPAT_FLOOR[chosen.cuda.major]}, and every GPU has a cubin")
    return f"highest usable CUDA {target.major}.x ≤ driver CUDA {driver.version}"


def _no_library_reason(entries: tuple[LibraryEntry, ...], target: CudaVersion,
                       context: str, driver: Optional[CudaVersion], devices: tuple[Device, ...]) -> str:
    bundled = [e.cuda for e in entries if e.cuda is not None]
    orphans = [d for d in devices if not any(covers(e, d.capability) for e in entries)]
    if orphans and entries:
        lowest = min(((p[0], p[1]) for e in entries for a in (*e.archs, *e.ptx) if (p := _parse_arch(a))),
                     default=None)
        older = lowest is not None and all(d.capability < lowest for d in orphans)
        what = (f"older than every bundled library (sm_{lowest[0]}{lowest[1]}+)" if older
                else "not covered by any bundled library's cubins or PTX")
        archs = ",".join(sorted({f"{d.capability[0]}{d.capability[1]}" for d in orphans}))
        gpus = ", ".join(f"{d.sm}{f' ({d.name})' if d.name else ''}" for d in orphans)
        return (f"GPU {gpus} {'is' if len(orphans) == 1 else 'are'} {what}: using the CPU library; "
                f"build from source with `nox -s build -- --arch {archs}`")
    fixes = []
    same_major = [e for e in entries if e.cuda is not None and e.cuda.major == target.major]
    newer = [e for e in same_major if driver is not None and e.cuda is not None and e.cuda > driver]
    if newer:
        lowest = min(newer, key=lambda e: e.cuda)  # type: ignore[arg-type,return-value]
        assert lowest.cuda is not None
        fixes.append(f"update the NVIDIA driver to ≥ {MIN_DRIVER[lowest.cuda]}" if lowest.cuda in MIN_DRIVER
                     else f"update the NVIDIA driver to one supporting CUDA {lowest.cuda}")
    fixes.append(f"build from source with `nox -s build -- --cuda {target}`")
    uncovered = sorted({d.sm for d in devices if not any(covers(e, d.capability) for e in same_major)})
    arch_note = f" ({', '.join(uncovered)} not covered)" if same_major and uncovered else ""
    return (f"no bundled CUDA library runs on {context}{arch_note} (bundled: {_list(bundled)}): "
            f"using the CPU library; {' or '.join(fixes)}")
