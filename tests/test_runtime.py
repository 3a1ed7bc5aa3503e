"""The runtime: a light import, `python -m kbit`, the loader's choices, checks, errors and locking."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import kbit
import pytest
from kbit import KbitConfigError, KbitLibraryError, KbitManifestError, KbitWarning
from kbit._probes import DriverProbe, Probes, TorchProbe, probe_driver
from kbit._versions import CudaVersion

NO_DRIVER = Probes(TorchProbe(True, "2.13.0", None, None, 0), DriverProbe(False, error="libcuda.so.1: cannot open"))
A100_CU124 = Probes(
    TorchProbe(True, "2.13.0", CudaVersion(12, 4), None, 1),
    DriverProbe(True, "libcuda.so.1", CudaVersion(12, 4), (kbit._probes.Device(0, "A100", (8, 0)),)),
)
HAS_DRIVER = probe_driver().found


def write_manifest(package_dir: Path, libraries: list[dict]) -> None:
    (package_dir / "manifest.json").write_text(json.dumps(
        {"schema": 1, "kbit_version": "0.1.0", "abi": 1, "libraries": libraries}))


def entry(path: Path, backend: str = "cpu", cuda: str | None = None, archs=(), ptx=()) -> dict:
    return {"file": path.name, "backend": backend, "cuda": cuda, "archs": list(archs), "ptx": list(ptx),
            "sha256": "", "size": path.stat().st_size, "toolkit": None, "compiler": "test"}


@pytest.fixture
def cpu_lib(package_dir: Path) -> Path:
    path = package_dir / "libkbit_cpu.so"
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it (sh tests/dev_layout.sh) or install the wheel")
    return path


# --- import ----------------------------------------------------------------------------------------


def test_import_is_light(run_python) -> None:
    code = ("import sys, kbit; heavy = [m for m in ('torch', 'kbit._native', 'kbit._probes', 'kbit.functional') "
            "if m in sys.modules]; assert not heavy, heavy; print(kbit.__version__)")
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == kbit.__version__


@pytest.mark.parametrize(
    "env,message",
    [
        ({"KBIT_BACKEND": "bogus"}, "KBIT_BACKEND='bogus' is not one of auto, cpu, cuda"),
        ({"KBIT_CUDA_VERSION": "nope"}, "KBIT_CUDA_VERSION='nope' is not a CUDA version"),
        ({"KBIT_CUDA_VERSION": "99.9"}, "CUDA 99.9 is not bundled"),
    ],
)
def test_bad_override_fails_at_first_use_not_import(run_python, env: dict[str, str], message: str) -> None:
    code = ("import kbit\nprint('imported')\nimport torch\n"
            "try:\n    kbit.functional.quantize_blockwise(torch.ones(64), blocksize=64)\n"
            "except kbit.KbitConfigError as e:\n    print('error:', e)\n")
    r = run_python("-c", code, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "imported"
    assert message in lines[1]


# --- python -m kbit --------------------------------------------------------------------------------


def test_cli_text(run_python, cpu_lib: Path) -> None:
    r = run_python("-m", "kbit")
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("platform", "python", "torch", "driver", "manifest", "libkbit_cpu.so", "choice", "status     ok"):
        assert label in r.stdout
    if not HAS_DRIVER:
        assert "no NVIDIA driver found" in r.stdout


def test_cli_json(run_python, cpu_lib: Path) -> None:
    r = run_python("-m", "kbit", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and report["errors"] == []
    assert report["cpu_library"]["build_info"]["backend"] == "cpu"
    assert {e["file"] for e in report["manifest"]["libraries"]} >= {"libkbit_cpu.so"}
    if not HAS_DRIVER:
        assert report["decision"]["backend"] == "cpu" and report["decision"]["loaded"] is None
        assert "no NVIDIA driver found" in report["decision"]["reason"]


def test_cli_fails_without_manifest(run_python, package_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(package_dir, tmp_path / "kbit", ignore=shutil.ignore_patterns("manifest.json", "__pycache__"))
    r = run_python("-m", "kbit", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1
    assert "manifest.json is missing" in r.stdout and "reinstall kbit" in r.stdout


# --- the loader ------------------------------------------------------------------------------------


def test_cuda_choice_without_driver_is_cpu(fresh_native) -> None:
    load = fresh_native._load("cuda", env={}, probes=NO_DRIVER)
    assert load.library is None and load.decision.backend == "cpu"
    assert load.reason.startswith("no NVIDIA driver found (libcuda.so.1: cannot open): using the CPU library")


@pytest.mark.skipif(HAS_DRIVER, reason="an NVIDIA driver is present")
def test_cuda_choice_on_this_machine(fresh_native, monkeypatch) -> None:
    monkeypatch.delenv("KBIT_BACKEND", raising=False)
    monkeypatch.delenv("KBIT_CUDA_VERSION", raising=False)
    monkeypatch.delenv("KBIT_LIBRARY", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU: the CPU pick is expected, not warned about
        load = fresh_native.cuda_library()
    assert load.library is None and "no NVIDIA driver found" in load.reason


def test_cpu_library_loads_and_checks(fresh_native, cpu_lib: Path) -> None:
    lib = fresh_native._load("cpu", env={})
    assert Path(lib.path) == cpu_lib and lib.backend == "cpu"
    assert lib.build_info["abi"] == fresh_native.ABI_VERSION


def test_failing_cuda_candidates_fall_through(fresh_native, cpu_lib: Path, tmp_path: Path) -> None:
    # Two "CUDA" libraries that are really the CPU library: kbit_build_info() disagrees with the manifest.
    for name in ("libkbit_cuda124.so", "libkbit_cuda122.so"):
        shutil.copy(cpu_lib, tmp_path / name)
    (tmp_path / "libkbit_cuda120.so").write_bytes(b"not an ELF file")
    shutil.copy(cpu_lib, tmp_path / "libkbit_cpu.so")
    write_manifest(tmp_path, [entry(tmp_path / "libkbit_cpu.so")] + [
        entry(tmp_path / f"libkbit_cuda12{m}.so", "cuda", f"12.{m}", ["80"]) for m in (0, 2, 4)])
    load = fresh_native._load("cuda", package_dir=tmp_path, env={}, probes=A100_CU124)
    assert load.decision.file == "libkbit_cuda124.so" and load.decision.exact
    assert load.decision.fallbacks == ("libkbit_cuda122.so", "libkbit_cuda120.so")
    assert load.library is None
    failures = dict(load.failures)
    assert list(failures) == ["libkbit_cuda124.so", "libkbit_cuda122.so", "libkbit_cuda120.so"]
    assert "kbit_build_info() disagrees with the manifest: backend 'cpu' (manifest: 'cuda')" in failures[
        "libkbit_cuda124.so"]
    assert "not an ELF file" in failures["libkbit_cuda120.so"]  # refused before dlopen
    assert load.reason.startswith("no CUDA library could be loaded (libkbit_cuda124.so: ")


def test_size_mismatch_is_refused(fresh_native, cpu_lib: Path, tmp_path: Path) -> None:
    shutil.copy(cpu_lib, tmp_path / "libkbit_cpu.so")
    write_manifest(tmp_path, [{**entry(tmp_path / "libkbit_cpu.so"), "size": 1}])
    with pytest.raises(KbitLibraryError, match="the manifest says 1: the file was replaced"):
        fresh_native._load("cpu", package_dir=tmp_path, env={})


def test_build_info_mismatch_is_refused(fresh_native, cpu_lib: Path, tmp_path: Path) -> None:
    shutil.copy(cpu_lib, tmp_path / "libkbit_cpu.so")
    write_manifest(tmp_path, [entry(tmp_path / "libkbit_cpu.so", archs=["80"])])
    with pytest.raises(KbitLibraryError, match=r"archs \[\] \(manifest: \['80'\]\)"):
        fresh_native._load("cpu", package_dir=tmp_path, env={})


@pytest.mark.parametrize("content,message", [(None, "is missing"), ("{not json", "is corrupt")])
def test_bad_manifest_at_first_use(fresh_native, tmp_path: Path, content, message) -> None:
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(KbitManifestError, match=message):
        fresh_native._load("cpu", package_dir=tmp_path, env={})
    with pytest.raises(KbitManifestError, match=message):
        fresh_native._load("cuda", package_dir=tmp_path, env={}, probes=NO_DRIVER)


def other_abi_source(abi: int) -> str:
    """A library that answers kbit_abi_version() with `abi` and has none of the kernels (an older or
    newer kbit): the loader must ask for the ABI before it binds anything else."""
    info = json.dumps({"backend": "cpu", "abi": abi, "cuda": None, "archs": [], "ptx": []}).replace('"', '\\"')
    return (f"int kbit_abi_version(void) {{ return {abi}; }}\n"
            f'const char* kbit_build_info(void) {{ return "{info}"; }}\n'
            "const char* kbit_status_string(int s) { (void)s; return \"?\"; }\n")


@pytest.mark.parametrize("delta", [-1, 1], ids=["older", "newer"])
def test_abi_mismatch_is_refused(fresh_native, tmp_path: Path, delta: int) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    abi = fresh_native.ABI_VERSION + delta
    (tmp_path / "other.c").write_text(other_abi_source(abi))
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libkbit_cpu.so"), str(tmp_path / "other.c")],
                   check=True)
    write_manifest(tmp_path, [entry(tmp_path / "libkbit_cpu.so")])
    want = f"ABI {abi}, this kbit runtime needs ABI {fresh_native.ABI_VERSION}"
    with pytest.raises(KbitLibraryError, match=want):
        fresh_native._load("cpu", package_dir=tmp_path, env={})


def test_kbit_library_override(fresh_native, cpu_lib: Path) -> None:
    with pytest.raises(KbitConfigError, match=re.escape("KBIT_LIBRARY=/nonexistent/libkbit_cuda124.so: no such file")):
        fresh_native._load("cuda", env={"KBIT_LIBRARY": "/nonexistent/libkbit_cuda124.so"}, probes=NO_DRIVER)
    load = fresh_native._load("cuda", env={"KBIT_LIBRARY": str(cpu_lib)}, probes=NO_DRIVER)
    assert load.library is not None and load.library.path == str(cpu_lib)
    assert load.decision.override == "KBIT_LIBRARY" and load.decision.warn


def test_decision_is_logged_and_warned_once(fresh_native, cpu_lib: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("KBIT_LIBRARY", str(cpu_lib))
    caplog.set_level("INFO", logger="kbit")
    with pytest.warns(KbitWarning, match="KBIT_LIBRARY=") as record:
        first = fresh_native.cuda_library()
        second = fresh_native.cuda_library()
    assert first is second
    assert len([w for w in record if issubclass(w.category, KbitWarning)]) == 1
    assert len([r for r in caplog.records if "KBIT_LIBRARY=" in r.getMessage()]) == 1


def test_two_threads_load_once(fresh_native, monkeypatch) -> None:
    calls = []
    real = fresh_native._load

    def slow_load(backend, *args, **kwargs):
        calls.append(backend)
        time.sleep(0.2)  # long enough for the other thread to arrive while this one loads
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(fresh_native, "_load", slow_load)
    start = threading.Barrier(2)
    results = []

    def worker() -> None:
        start.wait()
        results.append(fresh_native.cpu_library())

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["cpu"]
    assert len(results) == 2 and results[0] is results[1]


def test_errors_are_typed() -> None:
    for cls in (kbit.KbitConfigError, kbit.KbitManifestError, kbit.KbitLibraryError, kbit.KbitNoBackendError,
                kbit.KbitNativeError):
        assert issubclass(cls, kbit.KbitError)
    assert issubclass(kbit.KbitNativeError, RuntimeError) and issubclass(kbit.KbitConfigError, ValueError)
