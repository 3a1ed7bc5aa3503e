"""`nox -s build`: every CUDA row this machine can build, then the fat wheel, the sdist, the slim
wheels and the report. Run by the noxfile in the build session's venv (where the wheel tools are):

    python -m ci.build                        every row this machine can build, then the wheels in dist/
    python -m ci.build --cuda 12.4 --host     one row (repeatable), with a host toolkit
    python -m ci.build --cuda 12.4 --library-only    CI's per-row job: the library + record in build/stage/
    python -m ci.build --staged               CI's fan-in: the wheels from the libraries in build/stage/

The steps: rows (kbit_ci.build_row, each staged with its build record) -> fat wheel (pip wheel with
the staged libraries; CMake's install step writes the manifest) -> auditwheel repair -> sdist ->
slim wheels (ci.slim_wheels) -> report (ci.report). Needs `kbit`'s stdlib helpers importable: the
noxfile puts python/ on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import report, slim_wheels
from .kbit_ci import REPO, proc
from .kbit_ci.build_row import (
    available_rows,
    build_row,
    ccache_args,
    ccache_env,
    git_revision,
    resolve_mode,
    source_date_epoch,
    unbuilt_summary,
)
from .kbit_ci.errors import BuildError, KbitCiError
from .kbit_ci.locks import cache_dir
from .kbit_ci.matrix import Row, load_matrix, select_rows, with_extra_archs
from .kbit_ci.portable import POLICY, ensure_zig, zig_cmake_args

__all__ = ["DIST", "NEVER_BUNDLED", "STAGE", "build_record", "main", "parse_args", "repair_command"]

DIST = REPO / "dist"
STAGE = REPO / "build" / "stage"
# The driver's libraries: they must come from the user's machine, never from the wheel.
NEVER_BUNDLED = ("libcuda.so.1",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nox -s build --", description="Build kbit's CUDA libraries and the fat wheel.")
    p.add_argument("--cuda", action="append", default=[], metavar="X.Y",
                   help="build only this CUDA row (repeatable); default: every row this machine can build")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--host", dest="mode", action="store_const", const="host",
                      help="use toolkits on the host (system CUDA, PyPI wheels, Debian packages)")
    mode.add_argument("--container", dest="mode", action="store_const", const="container",
                      help="use the per-CUDA build containers (the default where podman or docker runs)")
    p.add_argument("--no-cuda", action="store_true", help="build only the CPU library into the wheel")
    p.add_argument("--arch", action="append", default=[], metavar="XY",
                   help="also compile a cubin for sm_XY (repeatable), e.g. 61 for a Pascal GPU no row covers")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ci = p.add_mutually_exclusive_group()
    ci.add_argument("--library-only", action="store_true",
                    help="stop after staging the CUDA libraries and build records in build/stage/ (CI's per-row jobs)")
    ci.add_argument("--staged", action="store_true",
                    help="build no CUDA row: make the wheels from the libraries already in build/stage/ (CI's fan-in)")
    p.set_defaults(mode="auto")
    args = p.parse_args(argv)
    if args.staged and (args.cuda or args.arch or args.no_cuda):
        p.error("--staged takes the staged libraries as they are: no --cuda, --arch or --no-cuda with it")
    return args


def _staged_records() -> list[dict]:
    """The build records of the libraries already in build/stage/ (downloaded by CI's fan-in job)."""
    libs = sorted(STAGE.glob("libkbit_cuda*.so"))
    if not libs:
        raise BuildError(f"--staged: no libkbit_cuda*.so in {STAGE}")
    records = []
    for lib in libs:
        rec = lib.with_suffix(".json")
        if not rec.is_file():
            raise BuildError(f"--staged: {lib.name} has no build record {rec.name} beside it")
        records.append(json.loads(rec.read_text()))
    proc.log("staged CUDA libraries: " + ", ".join(p.name for p in libs))
    return records


def build_record(row: Row, built) -> dict:
    """What the wheel's manifest and the report learn of a staged library (build/stage/libkbit_cudaXY.json)."""
    return {
        "cuda": str(row.cuda),
        "toolkit": {"source": built.toolkit_source, "version": built.toolkit_version, "image": built.image,
                    "linker": built.linker},
        "compiler": built.compiler,
        "host_compiler": built.host_compiler,
        "seconds": round(built.seconds, 1),
        "cached": built.cached,
    }


def _chosen_rows(args: argparse.Namespace, skipped: list) -> list[Row]:
    """The rows to build; those this machine cannot build are appended to `skipped` as (row, why)."""
    rows = with_extra_archs(select_rows(load_matrix(), args.cuda), args.arch)
    chosen = []
    for row, why_not in available_rows(rows, args.mode):
        if why_not is None:
            chosen.append(row)
        elif args.cuda:
            raise BuildError(f"CUDA {row.cuda} cannot be built here: {why_not}")
        else:
            proc.log(f"skipping CUDA {row.cuda}: {why_not}")
            skipped.append((row, why_not))
    if not chosen:
        raise BuildError("no CUDA row can be built on this machine (see the reasons above); "
                         "use --no-cuda for a CPU-only wheel")
    return chosen


def _stage_cuda_libraries(args: argparse.Namespace, revision: str, skipped: list) -> list[dict]:
    """Build each selected row's library and stage it, with its build record, in build/stage/."""
    STAGE.mkdir(parents=True, exist_ok=True)
    for old in [*STAGE.glob("libkbit_cuda*.so"), *STAGE.glob("libkbit_cuda*.json")]:
        old.unlink()
    if args.no_cuda:
        return []
    chosen = _chosen_rows(args, skipped)
    proc.log("building CUDA rows: " + ", ".join(str(r.cuda) for r in chosen))
    records = []
    for i, row in enumerate(chosen, 1):
        proc.log(f"[{i}/{len(chosen)}] CUDA {row.cuda}: archs {' '.join(row.archs)} + PTX {row.ptx}")
        built = build_row(row, mode=args.mode, repo=REPO, jobs=args.jobs, revision=revision)
        shutil.copy2(built.path, STAGE / row.library)
        record = build_record(row, built)
        (STAGE / (Path(row.library).stem + ".json")).write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    return records


def _wheel(revision: str) -> Path:
    """The fat wheel: the CPU library built here, the staged CUDA libraries, the manifest; repaired.

    The CPU library links with the same hash-locked zig as the CUDA rows and compiles through ccache
    when it is installed; auditwheel then checks every library against the policy's manylinux tag.
    """
    cache = cache_dir(os.environ, REPO)
    zig = ensure_zig(cache)
    defines = [*zig_cmake_args(zig.exe, cache / "zig"), *ccache_args(shutil.which("ccache") is not None)]
    env = {**ccache_env(cache / "ccache" / "cpu", REPO), "SOURCE_DATE_EPOCH": source_date_epoch(REPO),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    raw = REPO / "build" / "raw-wheel"
    shutil.rmtree(raw, ignore_errors=True)
    proc.run([
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", raw, REPO,
        f"-Ccmake.define.KBIT_STAGED_DIR={STAGE}",
        f"-Ccmake.define.KBIT_SOURCE_REVISION={revision}",
        "-Ccmake.define.KBIT_CUDA=OFF",  # the CUDA libraries are the staged rows', never one of this host's toolkit
        *(f"-Ccmake.define.{d.removeprefix('-D')}" for d in defines),
    ], env=env)
    (built,) = raw.glob("kbit-*.whl")
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("kbit-*.whl"):
        old.unlink()
    proc.run([sys.executable, "-m", *repair_command(built, DIST)])
    (wheel,) = DIST.glob("kbit-*.whl")
    proc.run([sys.executable, "-m", "auditwheel", "show", wheel])
    return wheel


def repair_command(wheel: Path, dest: Path) -> list[str]:
    """`auditwheel repair`: fails unless every library fits the policy's manylinux tag; grafts no driver."""
    excludes = [arg for lib in NEVER_BUNDLED for arg in ("--exclude", lib)]
    return ["auditwheel", "repair", "--plat", POLICY.platform, *excludes, "-w", str(dest), str(wheel)]


def _sdist() -> Path:
    """dist/kbit-X.tar.gz (scikit-build-core's PEP 517 hook): the sources a build needs, nothing of
    .cache/, build/ or dist/. `pip install` of it builds the CPU library and, where a CUDA toolkit is
    found, that toolkit's library (CMakeLists.txt, KBIT_CUDA=AUTO)."""
    for old in DIST.glob("kbit-*.tar.gz"):
        old.unlink()
    out = proc.run([sys.executable, "-c", "import sys; from scikit_build_core.build import build_sdist; "
                    "print(build_sdist(sys.argv[1]))", DIST], cwd=REPO, capture=True).stdout
    sdist = DIST / out.strip().splitlines()[-1]
    proc.log(f"sdist: {sdist} ({sdist.stat().st_size / 1e6:.2f} MB)")
    return sdist


def _report(wheel: Path, seconds: float, unbuilt: list[str]) -> None:
    """The table in the log, dist/report.md and dist/report.png, from the build records in build/stage/."""
    slim = sorted((DIST / "slim").glob("kbit-*.whl"))
    lines, _ = report.write_report(wheel, report.read_records(STAGE), DIST, seconds, slim, unbuilt)
    print("\n".join(lines), flush=True)


def build(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    revision = git_revision(REPO)
    skipped: list = []
    if args.staged:
        _staged_records()  # every staged library has its record (the report reads them)
    else:
        _stage_cuda_libraries(args, revision, skipped)
    unbuilt = unbuilt_summary(skipped, resolve_mode(args.mode))
    if args.library_only:
        proc.log(f"staged in {STAGE}: " + ", ".join(p.name for p in sorted(STAGE.glob("libkbit_cuda*"))))
    else:
        wheel = _wheel(revision)
        _sdist()
        slim_wheels.slim_wheels(wheel, DIST / "slim")
        _report(wheel, time.monotonic() - t0, unbuilt)
    for line in unbuilt:  # once, at the very end
        proc.log(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        build(args)
    except KbitCiError as e:
        proc.log(f"build failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
