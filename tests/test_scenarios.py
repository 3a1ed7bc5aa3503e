"""The combination matrix: driver × devices × torch × bundled libraries × overrides.

One table, SCENARIOS, feeds two halves:

  * the policy half (test_policy_decides_the_scenario) runs on any machine: kbit._policy.select over
    the probes the scenario describes and a manifest of its libraries as ci/matrix.toml defines them
    (archs, PTX). No file, driver or process is involved.
  * the end-to-end half (test_scenario_end_to_end) runs `python -m kbit --json` in its own process,
    through the real probes, policy and loader, against a package copy holding the real built CUDA
    libraries (those the scenario bundles are in its manifest). A scenario whose libraries were not
    built here skips, naming them; the others run. The driver is a stub libcuda.so.1 built here from
    tests/stub_libcuda/ and put on LD_LIBRARY_PATH; its real file is named libcuda.so.<branch>.54.15,
    as a real driver's is, so the probe reads the branch from it (or the file is plain libcuda.so.1:
    branch unknown). torch enters as a test double on sys.path that only says `torch.version.cuda`
    (CPU-only torch: None); "no torch" runs the child with -S so no site-packages is seen. No kernel
    is launched (--no-self-test): the stub cannot run one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from built_libraries import STAGE, copy_package, cuda_libraries
from kbit import KbitConfigError
from kbit._policy import select
from kbit._probes import Device, DriverProbe, LibraryEntry, Manifest, Probes, TorchProbe
from kbit._versions import CudaVersion, cpu_library_name, cuda_library_name

from ci.kbit_ci.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]
STUB_SOURCE = Path(__file__).resolve().parent / "stub_libcuda" / "libcuda_stub.c"
ALL = ("11.8", "12.4", "12.5", "13.0")

FAKE_TORCH = '''"""A test double for torch: only what kbit's torch probe reads."""
import os
import types

__version__ = "0.0.0+kbit.scenario"
version = types.SimpleNamespace(cuda=os.environ.get("KBIT_FAKE_TORCH_CUDA") or None, hip=None)


class cuda:
    @staticmethod
    def device_count():
        return int(os.environ.get("KBIT_FAKE_TORCH_DEVICES", "0"))

    @staticmethod
    def is_initialized():
        return False
'''


def _package_dir() -> Path:
    spec = importlib.util.find_spec("kbit")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _library(version: str) -> str:
    return cuda_library_name(CudaVersion.parse(version))


@dataclass(frozen=True)
class Env:
    """What the fixtures built: the package copy with every usable built CUDA library, its manifest,
    the stub, the fake torch, and why each CUDA library of ALL is not there."""

    root: Path
    manifest: dict
    stub: Path
    torch_dir: Path
    absent: dict[str, str] = field(default_factory=dict)
    """File name -> why that library is not in the copy (not built here, or built before the runtime)."""


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the stub libcuda")
    package = _package_dir()
    libs, left_out = cuda_libraries(package)
    absent = {name: left_out.get(name, f"{name} is not built here (in neither {package} nor {STAGE})")
              for name in map(_library, ALL) if name not in {lib.name for lib in libs}}
    root = tmp_path_factory.mktemp("scenarios")
    stub = root / "stub"
    stub.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(stub / "libcuda.so"), str(STUB_SOURCE)],
                   check=True, capture_output=True, text=True)
    full = root / "full" / "kbit"
    copy_package(package, full, libs)
    manifest = json.loads((full / "manifest.json").read_text())
    torch_dir = root / "faketorch" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text(FAKE_TORCH)
    return Env(root, manifest, stub / "libcuda.so", torch_dir.parent, absent)


@dataclass(frozen=True)
class Scenario:
    id: str
    driver: Optional[str]
    """The driver's CUDA version ("12.4"), or None: no libcuda at all."""
    devices: str = "8.0:NVIDIA A100-SXM4-80GB"
    torch: Optional[str] = "12.4"
    """torch's CUDA version; "cpu": a CPU-only torch; None: no torch."""
    libs: tuple[str, ...] = ALL
    branch: Optional[int] = None
    """The driver branch its file name says; None: an unversioned libcuda.so.1."""
    env: dict[str, str] = field(default_factory=dict)
    pick: Optional[str] = None
    """The library chosen for CUDA tensors (a CUDA version, "cpu"), or None when it is an error."""
    kind: str = ""
    """exact, highest, minor-compat, cross-major, cpu, override, error."""
    reason: str = ""
    """A substring of the reason (or of the error)."""
    init_error: Optional[int] = None
    """A CUresult for cuInit to fail with."""
    loader_error: bool = False
    """The error is the loader's, not the policy's (KBIT_LIBRARY names no file): the policy alone
    takes the override as it is."""


S = Scenario
SCENARIOS = [
    # torch 12.4, driver 12.4, an A100, and no 12.4 library.
    S("a100-no-exact-library-minor-compat", "12.4", libs=("11.8", "12.5", "13.0"), branch=550,
      pick="12.5", kind="minor-compat", reason="driver 550 ≥ 525, and every GPU has a cubin"),
    S("a100-no-exact-library-branch-unknown", "12.4", libs=("11.8", "12.5", "13.0"),
      pick="11.8", kind="cross-major", reason="no bundled CUDA 12.x runs here"),
    S("a100-all-bundled", "12.4", branch=550, pick="12.4", kind="exact"),
    # Colab-like driver jumps under an older torch.
    S("colab-12.6-t4", "12.6", devices="7.5:Tesla T4", branch=560, pick="12.4", kind="exact"),
    S("colab-12.8-t4-no-exact", "12.8", devices="7.5:Tesla T4", libs=("11.8", "12.5", "13.0"), branch=570,
      pick="12.5", kind="highest", reason="CUDA 12.5 is the highest bundled 12.x"),
    S("colab-12.8-l4-torch-12.6", "12.8", devices="8.9:NVIDIA L4", torch="12.6", branch=570,
      pick="12.5", kind="highest"),
    # A 13.x driver with only 12.x libraries.
    S("driver-13-libs-12-torch-12.4", "13.0", devices="9.0:NVIDIA H100", libs=("12.4", "12.5"), branch=580,
      pick="12.4", kind="exact"),
    S("driver-13-libs-12-torch-13", "13.0", devices="9.0:NVIDIA H100", torch="13.0", libs=("12.4", "12.5"),
      branch=580, pick="12.5", kind="cross-major", reason="CUDA 12.5 runs ≤ driver CUDA 13.0"),
    # Old 11.x drivers.
    S("driver-11.4-torch-11.8-minor-compat", "11.4", torch="11.8", branch=470, pick="11.8", kind="exact",
      reason="by minor-version compatibility"),
    S("driver-11.4-torch-12.4-minor-compat", "11.4", torch="12.4", libs=("11.8", "13.0"), branch=470,
      pick="11.8", kind="cross-major", reason="CUDA 11.8 runs by minor-version compatibility"),
    S("driver-11.4-branch-unknown", "11.4", torch="11.8", pick="cpu", kind="cpu",
      reason="update the NVIDIA driver to ≥ 520"),
    S("driver-11.4-below-floor", "11.4", torch="11.8", branch=440, pick="cpu", kind="cpu"),
    # Pascal: older than every bundled library.
    S("pascal-p100", "12.4", devices="6.1:Tesla P100-PCIE-16GB", branch=550, pick="cpu", kind="cpu",
      reason="GPU sm_61 (Tesla P100-PCIE-16GB) is older than every bundled library (sm_70+): using the CPU "
             "library; build from source with `nox -s build -- --arch 61`"),
    # Blackwell sm_120: 12.x libraries serve it through PTX compute_90 only.
    S("blackwell-ptx-only", "12.8", devices="12.0:NVIDIA RTX PRO 6000", torch="12.8", branch=570,
      pick="12.5", kind="highest"),
    S("blackwell-ptx-needs-new-driver", "12.4", devices="12.0:NVIDIA RTX PRO 6000", torch="12.4", branch=550,
      libs=("12.5",), pick="cpu", kind="cpu", reason="update the NVIDIA driver to ≥ 555"),
    S("blackwell-cubin-13", "13.0", devices="12.0:NVIDIA RTX PRO 6000", torch="13.0", branch=580,
      pick="13.0", kind="exact"),
    # Mixed GPUs.
    S("mixed-a100-p100", "12.4", devices="8.0:A100,6.1:Tesla P100", branch=550, pick="cpu", kind="cpu",
      reason="GPU sm_61 (Tesla P100) is older than every bundled library"),
    S("mixed-a100-blackwell-13", "13.0", devices="8.0:A100,12.0:RTX PRO 6000", torch="13.0", branch=580,
      pick="13.0", kind="exact"),
    S("mixed-v100-blackwell-13", "13.0", devices="7.0:Tesla V100,12.0:RTX PRO 6000", torch="13.0", branch=580,
      pick="12.5", kind="cross-major"),
    # No driver, a driver without devices, cuInit failing.
    S("no-driver", None, pick="cpu", kind="cpu", reason="no NVIDIA driver found"),
    S("no-device", "12.4", devices="", branch=550, pick="cpu", kind="cpu", reason="no CUDA device is visible"),
    S("cuinit-fails", "12.4", branch=550, init_error=100, pick="cpu", kind="cpu",
      reason="cuInit failed: CUDA_ERROR_NO_DEVICE (100)"),
    # torch without CUDA, and no torch: the driver's CUDA version is the target.
    S("cpu-torch", "12.4", torch="cpu", branch=550, pick="12.4", kind="exact", reason="the driver's CUDA 12.4"),
    S("no-torch", "12.5", torch=None, pick="12.5", kind="exact", reason="the driver's CUDA 12.5"),
    S("cpu-torch-driver-12.6", "12.6", torch="cpu", branch=560, pick="12.5", kind="highest"),
    # Overrides, good and bad.
    S("override-version-124", "12.6", env={"KBIT_CUDA_VERSION": "124"}, pick="12.4", kind="override"),
    S("override-version-12.5", "12.6", env={"KBIT_CUDA_VERSION": "12.5"}, pick="12.5", kind="override"),
    S("override-version-unbundled", "12.4", env={"KBIT_CUDA_VERSION": "12.3"}, kind="error",
      reason="CUDA 12.3 is not bundled (bundled: 11.8, 12.4, 12.5, 13.0"),
    S("override-version-garbage", "12.4", env={"KBIT_CUDA_VERSION": "twelve"}, kind="error",
      reason="is not a CUDA version"),
    S("override-library", "12.4", env={"KBIT_LIBRARY": "@libkbit_cuda124.so"}, pick="12.4", kind="override",
      reason="without checking"),
    S("override-library-missing", "12.4", env={"KBIT_LIBRARY": "/nonexistent/libkbit_cuda124.so"}, kind="error",
      reason="no such file", loader_error=True),
    S("override-backend-cpu", "12.4", env={"KBIT_BACKEND": "cpu"}, pick="cpu", kind="override"),
    S("override-backend-bad", "12.4", env={"KBIT_BACKEND": "gpu"}, kind="error",
      reason="KBIT_BACKEND='gpu' is not one of auto, cpu, cuda"),
    S("override-backend-cuda-no-driver", None, env={"KBIT_BACKEND": "cuda"}, kind="error",
      reason="KBIT_BACKEND=cuda but no NVIDIA driver found"),
]


def _real_driver_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _stub_dir(env: Env, branch: Optional[int]) -> Path:
    """A folder with libcuda.so.1 -> the stub, whose real file name carries `branch` (or none)."""
    name = f"libcuda.so.{branch}.54.15" if branch is not None else "libcuda.so.1"
    folder = env.root / f"driver-{branch or 'unknown'}"
    if not folder.is_dir():
        folder.mkdir()
        shutil.copy2(env.stub, folder / name)
        if branch is not None:
            (folder / "libcuda.so.1").symlink_to(name)
    return folder


def _package(env: Env, scenario: Scenario) -> Path:
    """A package copy whose manifest bundles only the scenario's libraries (all files stay)."""
    root = env.root / "pkg" / scenario.id
    pkg = root / "kbit"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(env.root / "full" / "kbit", pkg)
    keep = {"libkbit_cpu.so", *(f"libkbit_cuda{v.replace('.', '')}.so" for v in scenario.libs)}
    manifest = dict(env.manifest, libraries=[e for e in env.manifest["libraries"] if e["file"] in keep])
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return root


def _kind(decision: dict) -> str:
    if "error" in decision:
        return "error"
    if decision["override"]:
        return "override"
    if decision["backend"] == "cpu":
        return "cpu"
    taken = next(c["why"] for c in decision["candidates"] if c["verdict"] == "taken")
    for prefix, kind in (("exact match", "exact"), ("cross-major", "cross-major"),
                         ("minor-version compatibility", "minor-compat"), ("highest usable", "highest")):
        if taken.startswith(prefix):
            return kind
    raise AssertionError(f"unclassified: {taken}")


def run_scenario(env: Env, scenario: Scenario, python: str = sys.executable) -> tuple[int, dict, str]:
    """Run `python -m kbit --json` for the scenario: (exit status, report, stderr)."""
    root = _package(env, scenario)
    child = {k: v for k, v in os.environ.items() if not k.startswith(("KBIT_", "PYTHON", "LD_LIBRARY_PATH"))}
    paths = [str(root)]
    if scenario.torch is not None:
        paths.append(str(env.torch_dir))
        child["KBIT_FAKE_TORCH_CUDA"] = "" if scenario.torch == "cpu" else scenario.torch
        child["KBIT_FAKE_TORCH_DEVICES"] = str(len([d for d in scenario.devices.split(",") if d]))
    child["PYTHONPATH"] = os.pathsep.join(paths)
    if scenario.driver is not None:
        major, minor = scenario.driver.split(".")
        child["KBIT_STUB_DRIVER"] = str(int(major) * 1000 + int(minor) * 10)
        child["KBIT_STUB_DEVICES"] = scenario.devices
        child["LD_LIBRARY_PATH"] = str(_stub_dir(env, scenario.branch))
    if scenario.init_error is not None:
        child["KBIT_STUB_INIT_ERROR"] = str(scenario.init_error)
    for key, value in scenario.env.items():
        child[key] = str(root / "kbit" / value[1:]) if value.startswith("@") else value
    # -S: no site-packages, so neither a real torch nor an installed kbit is seen.
    r = subprocess.run([python, "-S", "-m", "kbit", "--json", "--no-self-test"], env=child, capture_output=True, text=True,
                       timeout=120, cwd=env.root)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from the child (exit {r.returncode}): {r.stdout}\n{r.stderr}") from None
    return r.returncode, report, r.stderr


def _absent(env: Env, scenario: Scenario) -> None:
    """Skip unless every CUDA library the scenario bundles was built (and is current) here."""
    absent = [name for name in map(_library, scenario.libs) if name in env.absent]
    if absent:
        pytest.skip(f"needs {', '.join(absent)}: " + "; ".join(env.absent[name] for name in absent))


def check(scenario: Scenario, status: int, report: dict, stderr: str) -> None:
    """The end-to-end outcome: exactly the scenario's pick, reason, devices and branch."""
    decision = report["decision"]
    assert "Traceback" not in stderr, stderr
    assert _kind(decision) == scenario.kind, decision
    if scenario.kind == "error":
        assert status == 1 and scenario.reason in decision["error"], decision
        return
    assert status == 0, report["errors"]
    text = decision["reason"]
    assert "\n" not in text
    assert scenario.reason in text, text
    assert not decision["failures"], decision
    if scenario.pick == "cpu":
        assert decision["backend"] == "cpu" and decision["loaded"] is None
    else:
        assert scenario.pick is not None
        want = _library(scenario.pick)
        assert decision["backend"] == "cuda" and Path(decision["file"]).name == want, decision
        assert decision["loaded"] is not None and Path(decision["loaded"]).name == want, decision
    devices = [d for d in scenario.devices.split(",") if d] if scenario.driver else []
    got = [f"{d['capability'][0]}.{d['capability'][1]}:{d['name']}" for d in report["driver"]["devices"]]
    assert got == (devices if scenario.init_error is None else [])
    assert report["driver"]["branch"] == (scenario.branch if scenario.driver else None)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_scenario_end_to_end(env: Env, scenario: Scenario) -> None:
    _absent(env, scenario)
    if scenario.driver is None and _real_driver_present():
        pytest.skip("a real libcuda.so.1 is installed: the no-driver scenario cannot hide it")
    check(scenario, *run_scenario(env, scenario))


# --- the policy half: the same table over synthetic probes and manifests --------------------------

ROWS = {r.cuda: r for r in load_matrix()}
PACKAGE = Path("/site-packages/kbit")
"""Where the synthetic package lives: only KBIT_LIBRARY's `@file` values are resolved against it."""
CU_ERROR_NAMES = {100: "CUDA_ERROR_NO_DEVICE"}
"""cuGetErrorName as tests/stub_libcuda names the errors the scenarios use."""


def _entry(version: str) -> LibraryEntry:
    row = ROWS[CudaVersion.parse(version)]
    return LibraryEntry(row.library, "cuda", row.cuda, row.archs, (row.ptx,))


def synthetic(scenario: Scenario) -> tuple[Probes, Manifest, dict[str, str]]:
    """The probes a machine like the scenario's gives, a manifest of its libraries as the matrix
    builds them, and its environment: what `python -m kbit` hands select() in the end-to-end half."""
    devices = tuple(Device(i, name, (int(cap.split(".")[0]), int(cap.split(".")[1])))
                    for i, (cap, _, name) in enumerate(d.partition(":") for d in scenario.devices.split(",") if d))
    if scenario.torch is None:
        torch = TorchProbe(False, error="torch is not installed")
    elif scenario.torch == "cpu":
        torch = TorchProbe(True, "0.0.0+kbit.scenario", None, None, 0)
    else:
        torch = TorchProbe(True, "0.0.0+kbit.scenario", CudaVersion.parse(scenario.torch), None, len(devices))
    if scenario.driver is None:
        driver = DriverProbe(False, error="libcuda.so.1: cannot open shared object file: No such file or directory")
    elif scenario.init_error is not None:
        error = f"cuInit failed: {CU_ERROR_NAMES[scenario.init_error]} ({scenario.init_error})"
        driver = DriverProbe(True, "libcuda.so.1", CudaVersion.parse(scenario.driver), error=error,
                             branch=scenario.branch)
    else:
        driver = DriverProbe(True, "libcuda.so.1", CudaVersion.parse(scenario.driver), devices,
                             branch=scenario.branch)
    cpu = LibraryEntry(cpu_library_name(), "cpu", None, (), ())
    manifest = Manifest("manifest.json", (cpu, *map(_entry, scenario.libs)), "0.1.0", 1)
    env = {k: str(PACKAGE / v[1:]) if v.startswith("@") else v for k, v in scenario.env.items()}
    return Probes(torch, driver), manifest, env


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_policy_decides_the_scenario(scenario: Scenario) -> None:
    probes, manifest, env = synthetic(scenario)
    if scenario.kind == "error" and not scenario.loader_error:
        with pytest.raises(KbitConfigError) as e:
            select(probes, manifest, env)
        assert scenario.reason in str(e.value)
        return
    decision = select(probes, manifest, env)
    if scenario.loader_error:
        assert decision.override == "KBIT_LIBRARY" and decision.file == env["KBIT_LIBRARY"], decision
        return
    assert _kind(asdict(decision)) == scenario.kind, decision
    assert "\n" not in decision.reason
    assert scenario.reason in decision.reason, decision.reason
    if scenario.pick == "cpu":
        assert decision.backend == "cpu", decision
    else:
        assert scenario.pick is not None
        assert decision.backend == "cuda" and Path(decision.file).name == _library(scenario.pick), decision


def test_scenarios_cover_every_kind_and_override() -> None:
    kinds = {s.kind for s in SCENARIOS}
    assert kinds == {"exact", "highest", "minor-compat", "cross-major", "cpu", "override", "error"}
    overrides = {k for s in SCENARIOS for k in s.env}
    assert overrides == {"KBIT_CUDA_VERSION", "KBIT_LIBRARY", "KBIT_BACKEND"}


def _interpreter(version: str) -> Optional[str]:
    """pyenv's newest CPython `version` (e.g. "3.9"), else one on PATH; None when absent."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}"),
                   key=lambda p: int(p.parts[-3].split(".")[2]) if p.parts[-3].split(".")[2].isdigit() else -1)
    if found:
        return str(found[-1])
    return shutil.which(f"python{version}")


PORTABILITY = [s for s in SCENARIOS if s.id in (
    "a100-no-exact-library-minor-compat", "blackwell-ptx-only", "pascal-p100", "override-version-unbundled")]


@pytest.mark.parametrize("scenario", PORTABILITY, ids=lambda s: s.id)
@pytest.mark.parametrize("version", ["3.9", "3.10", "3.11", "3.12", "3.13"])
def test_loader_under_every_supported_python(env: Env, version: str, scenario: Scenario) -> None:
    """The wheel is py3: the probes, policy and loader must run on every CPython it supports."""
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no CPython {version} here")
    _absent(env, scenario)
    status, report, stderr = run_scenario(env, scenario, python)
    assert report["python"].startswith(version + ".")
    check(scenario, status, report, stderr)
