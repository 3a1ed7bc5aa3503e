"""Mutation testing of the pure decision modules with mutmut (`nox -s mutate`).

mutmut expects the code under ./ or ./src; kbit keeps it under python/ and ci/. So this script lays
out a scratch tree (src/kbit, src/ci, src/docker, tests/, the project's pyproject.toml plus a
[tool.mutmut] section), runs `mutmut run` there, and judges the result: every mutant must be killed,
or be listed in tests/mutation/survivors.toml with the reason it cannot or need not be killed. A
survivor that is not listed, or a listed one that no longer survives, fails the run (the list stays
true). Prints the score per module.

    python tests/mutation/mutate.py [--work build/mutate] [--jobs 2] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]

# What is mutated: the decisions that are pure functions over plain data. (The probes' I/O halves,
# ctypes calls into libcuda and torch imports, are judged by the runtime tests against a stub driver.)
MUTATE = [
    "src/kbit/_policy.py",
    "src/kbit/_versions.py",
    "src/kbit/_manifest.py",
    "src/ci/kbit_ci/manifest.py",
    "src/ci/kbit_ci/matrix.py",
]
# _probes.py's driver_branch is a parser of /proc files; its functions that call into libcuda through
# ctypes or import torch are not judged here (the runtime tests run them against a stub driver). mutmut
# still generates their mutants (its do_not_mutate_patterns did not exclude them), so the results drop them.
MUTATE_PROBES = "src/kbit/_probes.py"
PROBES_IO = ("probe_torch", "_cu_error", "_query_driver", "probe_driver", "probe_all")
_IO_MUTANT = re.compile(rf"^kbit\._probes\.x_({'|'.join(PROBES_IO)})__mutmut_")

# The tests that judge those modules. Fast, no native library needed.
TESTS = [
    "tests/test_policy.py",
    "tests/test_policy_property.py",
    "tests/test_scenarios.py",
    "tests/test_cuda_versions.py",
    "tests/test_manifest_parsing.py",
    "tests/test_manifest_writer.py",
    "tests/test_matrix.py",
    "tests/test_matrix_loader.py",
]
TEST_SUPPORT = ["tests/conftest.py", "tests/machine.py", "tests/built_libraries.py", "tests/stub_libcuda"]

SURVIVORS = REPO / "tests" / "mutation" / "survivors.toml"

_RESULT = re.compile(r"^\s*(\S+): (.+)$")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so", "manifest.json"))
    elif src.exists():
        shutil.copy2(src, dst)


def cpu_library(build: Path) -> Path:
    """The CPU library, built from this checkout (the manifest writer's tests describe a real one)."""
    print(f"[mutate] building the CPU library in {build}", flush=True)
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DKBIT_CUDA=OFF"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True)
    found = sorted(build.rglob("libkbit_cpu.so"))
    if not found:
        raise SystemExit(f"mutate: no libkbit_cpu.so under {build}")
    return found[0]


def lay_out(work: Path, library: Path) -> None:
    """The scratch tree mutmut runs in; rebuilt from the repository every time."""
    if work.exists():
        shutil.rmtree(work)
    _copy(REPO / "python" / "kbit", work / "src" / "kbit")
    shutil.copy2(library, work / "src" / "kbit" / "libkbit_cpu.so")
    shutil.copy2(REPO / "csrc" / "include" / "kbit.h", work / "src" / "kbit" / "kbit.h")  # the ABI table
    # The build tooling is the package `ci` (imported as ci.kbit_ci...); under src/ only, so the tests
    # import the mutated copy. Its matrix names Dockerfiles relative to the tree ci/ sits in.
    _copy(REPO / "ci", work / "src" / "ci")
    _copy(REPO / "docker", work / "src" / "docker")
    _copy(REPO / "docker", work / "docker")
    for name in (*TESTS, *TEST_SUPPORT):
        _copy(REPO / name, work / name)
    config = {
        "source_paths": ["src"],
        "only_mutate": [*MUTATE, MUTATE_PROBES],
        "also_copy": ["docker"],
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-x"],
        "pytest_add_cli_args_test_selection": ["tests/"],
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {_toml(v)}" for k, v in config.items()]
    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + "\n".join(lines) + "\n")
    # A path that does not exist when the interpreter starts is cached as "no finder" and never
    # searched again; mutmut puts mutants/src on sys.path only after it has copied the tree.
    (work / "mutants" / "src").mkdir(parents=True)


def _toml(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_mutmut(work: Path, jobs: int) -> None:
    env = dict(os.environ)
    # Subprocesses the tests start (the CLI, the manifest writer) import the mutated tree too; mutmut
    # passes the mutant under test to them in the environment.
    env["PYTHONPATH"] = str(work / "mutants" / "src")
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=work, env=env,
                   check=True)


def results(work: Path) -> dict[str, str]:
    """mutant name -> status ("killed", "survived", "no tests", "timeout", ...)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, check=True,
                         capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        m = _RESULT.match(line)
        if m and not _IO_MUTANT.match(m.group(1)):
            found[m.group(1)] = m.group(2).strip()
    return found


def module_of(mutant: str) -> str:
    """kbit._policy.x_select__mutmut_12 -> kbit._policy"""
    return mutant.split(".x")[0].rsplit("ǁ", 1)[0]


def load_survivors(path: Path = SURVIVORS) -> dict[str, str]:
    """Listed survivors: mutant name -> why it is left."""
    if not path.exists():
        return {}
    data = tomllib.loads(path.read_text())
    listed = {}
    for group in data.get("survivor", []):
        for name in group["mutants"]:
            listed[name] = group["why"]
    return listed


def judge(found: dict[str, str], listed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(unlisted survivors, listed mutants that are now killed or gone)."""
    alive = {n for n, status in found.items() if status != "killed"}
    return sorted(alive - set(listed)), sorted(set(listed) - alive)


def score_table(found: dict[str, str]) -> str:
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, status in found.items():
        by_module[module_of(name)][status] += 1
    rows = ["module                     mutants  killed  survived  no tests  timeout  score"]
    total = collections.Counter()
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("all", total))
    return "\n".join(rows)


def _row(name: str, c: collections.Counter) -> str:
    n = sum(c.values())
    score = 100.0 * c["killed"] / n if n else 0.0
    return (f"{name:<26} {n:>7} {c['killed']:>7} {c['survived']:>9} {c['no tests']:>9} {c['timeout']:>8}"
            f"  {score:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "build" / "mutate")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-run", action="store_true", help="judge the results of the last run only")
    args = ap.parse_args(argv)
    if not args.no_run:
        lay_out(args.work, cpu_library(args.work.parent / "mutate-cpu"))
        run_mutmut(args.work, args.jobs)
    found = results(args.work)
    print(score_table(found))
    unlisted, stale = judge(found, load_survivors())
    for name in unlisted:
        print(f"SURVIVED (not in {SURVIVORS.relative_to(REPO)}): {name} [{found[name]}]"
              f"  -- see: cd {args.work} && python -m mutmut show {name}")
    for name in stale:
        print(f"LISTED BUT KILLED: {name}: remove it from {SURVIVORS.relative_to(REPO)}")
    return 1 if unlisted or stale else 0


if __name__ == "__main__":
    sys.exit(main())
