"""Slim per-CUDA wheels (dist/slim/kbit-X+cuXY-*.whl): made from the fat wheel, one CUDA library each,
a consistent manifest/METADATA/RECORD, deterministic, and they install and run like the fat wheel."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ci.slim_wheels import SlimWheelError, slim_version, slim_wheel, slim_wheels

REPO = Path(__file__).resolve().parents[1]


WHEEL = os.environ.get("KBIT_WHEEL")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="KBIT_WHEEL is not set (nox -s tests sets it)")


def _record_ok(path: Path) -> list[str]:
    """Every file's RECORD line matches its bytes and every file has one; returns the recorded names."""
    with zipfile.ZipFile(path) as z:
        (record_name,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        lines = z.read(record_name).decode().splitlines()
        recorded = {}
        for line in lines:
            name, digest, size = line.rsplit(",", 2)
            recorded[name] = (digest, size)
        assert recorded.pop(record_name) == ("", "")
        files = [i for i in z.infolist() if not i.is_dir() and i.filename != record_name]
        assert sorted(recorded) == sorted(i.filename for i in files)
        for i in files:
            data = z.read(i)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert recorded[i.filename] == (want, str(len(data))), i.filename
    return sorted(recorded)


# ---------------------------------------------------------------- on a synthetic fat wheel (no build needed)


def _fake_fat(tmp: Path, version: str = "0.3.0") -> Path:
    info = f"kbit-{version}.dist-info"
    libs = {"libkbit_cpu.so": None, "libkbit_cuda118.so": "11.8", "libkbit_cuda124.so": "12.4"}
    manifest = {"schema": 1, "kbit_version": version, "abi": 1, "libraries": [
        {"file": f, "backend": "cpu" if c is None else "cuda", "cuda": c, "size": 3} for f, c in libs.items()]}
    files = {
        "kbit/": b"",
        "kbit/__init__.py": b"# runtime\n",
        "kbit/_version.py": f'version = "{version}"\n'.encode(),
        **{f"kbit/{f}": f.encode() for f in libs},
        "kbit/manifest.json": json.dumps(manifest).encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: kbit\nVersion: {version}\n\nVersion: 9 in the text\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nTag: py3-none-manylinux_2_28_x86_64\n",
        f"{info}/RECORD": b"",
    }
    path = tmp / f"kbit-{version}-py3-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 2, 3, 4, 6)), data)
    return path


def test_slim_version():
    assert slim_version("0.2.0", "cu124") == "0.2.0+cu124"
    assert slim_version("0.2.1.dev3", "cu118") == "0.2.1.dev3+cu118"
    assert slim_version("0.2.0+g1a2b", "cu124") == "0.2.0+g1a2b.cu124"
    with pytest.raises(SlimWheelError):
        slim_version("0.2.0", "CU-124")


def test_synthetic_fat_wheel(tmp_path):
    fat = _fake_fat(tmp_path)
    made = slim_wheels(fat, tmp_path / "slim")
    assert [m.path.name for m in made] == [
        "kbit-0.3.0+cu118-py3-none-manylinux_2_28_x86_64.whl", "kbit-0.3.0+cu124-py3-none-manylinux_2_28_x86_64.whl"]
    with zipfile.ZipFile(made[1].path) as z:
        names = z.namelist()
        assert "kbit/libkbit_cuda118.so" not in names and "kbit/libkbit_cuda124.so" in names
        assert "kbit-0.3.0+cu124.dist-info/METADATA" in names
        meta = z.read("kbit-0.3.0+cu124.dist-info/METADATA").decode()
        assert "Version: 0.3.0+cu124\n" in meta and "Version: 9 in the text" in meta  # only the header changes
        manifest = json.loads(z.read("kbit/manifest.json"))
        assert z.read("kbit/_version.py") == b'version = "0.3.0+cu124"\n'
        assert z.getinfo("kbit/__init__.py").date_time == (2020, 1, 2, 3, 4, 6)
    assert [e["file"] for e in manifest["libraries"]] == ["libkbit_cpu.so", "libkbit_cuda124.so"]
    assert manifest["kbit_version"] == "0.3.0+cu124"
    _record_ok(made[1].path)
    again = slim_wheel(fat, tmp_path / "again", "libkbit_cuda124.so")
    assert again.path.read_bytes() == made[1].path.read_bytes(), "not deterministic"


def test_refuses_what_it_cannot_make(tmp_path):
    fat = _fake_fat(tmp_path)
    with pytest.raises(SlimWheelError, match=r"carries no libkbit_cuda130\.so"):
        slim_wheel(fat, tmp_path, "libkbit_cuda130.so")
    with pytest.raises(SlimWheelError, match=r"not a libkbit_cudaXY\.so"):
        slim_wheel(fat, tmp_path, "libkbit_cpu.so")
    with pytest.raises(SlimWheelError, match="not a wheel"):
        slim_wheel(tmp_path / "kbit.zip", tmp_path, "libkbit_cuda124.so")
    lying = tmp_path / "lying"
    lying.mkdir()
    renamed = lying / fat.name.replace("0.3.0", "0.4.0")
    renamed.write_bytes(fat.read_bytes())
    with pytest.raises(SlimWheelError, match=r"no kbit/manifest\.json or kbit-0\.4\.0\.dist-info/RECORD"):
        slim_wheel(renamed, tmp_path, "libkbit_cuda124.so")


# ---------------------------------------------------------------- the real ones, from `nox -s build`


@pytest.fixture(scope="module")
def fat() -> Path:
    return Path(WHEEL)


@pytest.fixture(scope="module")
def slim(fat) -> list[Path]:
    return sorted((fat.parent / "slim").glob("kbit-*.whl"))


def _manifest(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("kbit/manifest.json"))


@needs_wheel
def test_one_slim_wheel_per_cuda_library(fat, slim):
    _, version, py, abi, plat = fat.name[:-4].split("-")
    cuda = [e for e in _manifest(fat)["libraries"] if e["backend"] == "cuda"]
    assert cuda, "the fat wheel carries no CUDA library"
    want = [f"kbit-{version}+cu{e['cuda'].replace('.', '')}-{py}-{abi}-{plat}.whl" for e in cuda]
    assert [p.name for p in slim] == sorted(want)


@needs_wheel
def test_slim_contents(fat, slim):
    fat_manifest = _manifest(fat)
    by_file = {e["file"]: e for e in fat_manifest["libraries"]}
    with zipfile.ZipFile(fat) as z:
        fat_py = {n: z.read(n) for n in z.namelist() if n.endswith(".py") and n != "kbit/_version.py"}
        fat_libs = {n: z.read(n) for n in z.namelist() if n.endswith(".so")}
    for path in slim:
        local = re.search(r"\+(cu\d+)-", path.name).group(1)
        lib = f"libkbit_cuda{local[2:]}.so"
        m = _manifest(path)
        assert [e["file"] for e in m["libraries"]] == ["libkbit_cpu.so", lib]
        assert m["libraries"] == [by_file["libkbit_cpu.so"], by_file[lib]]  # sha256, archs... as built
        assert m["kbit_version"] == path.name.split("-")[1] == f"{fat_manifest['kbit_version']}+{local}"
        with zipfile.ZipFile(path) as z:
            libs = sorted(n for n in z.namelist() if n.endswith(".so"))
            assert libs == ["kbit/libkbit_cpu.so", f"kbit/{lib}"]
            for n in libs:
                assert z.read(n) == fat_libs[n]
            assert {n: z.read(n) for n in fat_py} == fat_py  # the same runtime
        _record_ok(path)


@needs_wheel
def test_slim_wheels_are_reproducible(fat, slim, tmp_path):
    again = slim_wheels(fat, tmp_path)
    assert [p.path.read_bytes() for p in again] == [p.read_bytes() for p in slim]


@needs_wheel
def test_every_slim_wheel_installs_and_runs(slim, tmp_path):
    assert slim, "no slim wheel in dist/slim"
    for pick in slim:
        _install_and_run(pick, tmp_path / pick.name)


def _install_and_run(pick: Path, tmp_path: Path) -> None:
    """As a user would: install the one wheel (no fat wheel on the path first), then the report, the
    CPU self-test and `verify` of exactly its two libraries."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(pick)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["PYTHONPATH"] = str(target)  # ahead of the fat wheel installed in this environment
    out = subprocess.run([sys.executable, "-m", "kbit", "--json"], env=env, cwd="/", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert Path(report["package_dir"]) == target / "kbit"
    assert report["kbit"] == pick.name.split("-")[1] == report["manifest"]["kbit_version"]
    assert [lib["file"] for lib in report["manifest"]["libraries"]] == [
        "libkbit_cpu.so", "libkbit_cuda" + re.search(r"\+cu(\d+)-", pick.name).group(1) + ".so"]
    cpu_test = [t for t in report["self_test"] if t["device"] == "cpu"]
    assert cpu_test and "error" not in cpu_test[0]
    if "skipped" not in cpu_test[0]:
        assert cpu_test[0]["max_relative_error"] <= 0.02
    verify = subprocess.run([sys.executable, "-m", "kbit", "verify"], env=env, cwd="/", capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 of 2 libraries match" in verify.stdout
