"""The build's manifest writer (ci/kbit_ci/manifest.py) on a real CPU library: what each entry says,
read back independently (hashlib, the library's own kbit_build_info), and that the runtime's reader
takes what the writer wrote. The library is the installed package's (nox -s tests), or the dev layout's."""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from kbit._probes import parse_manifest

from ci.kbit_ci.manifest import write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_library() -> Path:
    import kbit

    lib = Path(kbit.__file__).resolve().parent / "libkbit_cpu.so"
    if not lib.is_file():
        pytest.skip(f"no CPU library beside {kbit.__file__} (run nox -s tests, or tests/dev_layout.sh)")
    return lib


def own_build_info(path: Path) -> dict:
    lib = ctypes.CDLL(str(path))
    lib.kbit_build_info.restype = ctypes.c_char_p
    return json.loads(lib.kbit_build_info())


def test_the_cpu_entry_says_what_the_library_is(tmp_path: Path, cpu_library: Path) -> None:
    shutil.copy2(cpu_library, tmp_path / "libkbit_cpu.so")
    (tmp_path / "libkbit_other.txt").write_text("not a library")
    written = write_manifest(tmp_path, "1.2.3")
    info = own_build_info(tmp_path / "libkbit_cpu.so")
    data = (tmp_path / "libkbit_cpu.so").read_bytes()
    assert written == {
        "schema": 1, "kbit_version": "1.2.3", "abi": info["abi"],
        "libraries": [{
            "file": "libkbit_cpu.so", "backend": "cpu", "cuda": None, "archs": [], "ptx": [],
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "toolkit": None,
            "compiler": info["compiler"], "host_compiler": info.get("host_compiler"),
            "revision": info["revision"], "abi": info["abi"],
        }],
    }
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"
    m = parse_manifest(text)
    assert m.ok and m.abi == info["abi"] and m.kbit_version == "1.2.3" and m.note is None
    assert [(e.file, e.backend, e.cuda, e.size) for e in m.libraries] == [("libkbit_cpu.so", "cpu", None, len(data))]


def test_a_note_is_written_only_when_given(tmp_path: Path, cpu_library: Path) -> None:
    shutil.copy2(cpu_library, tmp_path / "libkbit_cpu.so")
    assert write_manifest(tmp_path, "1.0", note="no CUDA toolkit: see README")["note"] == "no CUDA toolkit: see README"
    assert parse_manifest((tmp_path / "manifest.json").read_text()).note == "no CUDA toolkit: see README"
    assert "note" not in write_manifest(tmp_path, "1.0", note="")


def test_libraries_are_listed_cpu_first_then_by_name(tmp_path: Path, cpu_library: Path) -> None:
    for name in ("libkbit_cpu_b.so", "libkbit_a.so", "libkbit_cpu.so"):
        shutil.copy2(cpu_library, tmp_path / name)
    assert [e["file"] for e in write_manifest(tmp_path, "1.0")["libraries"]] == [
        "libkbit_cpu.so", "libkbit_a.so", "libkbit_cpu_b.so"]


def test_a_cpu_library_under_a_cuda_name_is_refused(tmp_path: Path, cpu_library: Path) -> None:
    shutil.copy2(cpu_library, tmp_path / "libkbit_cuda124.so")
    with pytest.raises(ValueError) as info:
        write_manifest(tmp_path, "1.0")
    assert str(info.value) == "libkbit_cuda124.so: kbit_build_info() says backend 'cpu'"
    assert not (tmp_path / "manifest.json").exists()


def test_an_empty_directory_gives_an_empty_manifest(tmp_path: Path) -> None:
    assert write_manifest(tmp_path, "1.0") == {"schema": 1, "kbit_version": "1.0", "abi": None, "libraries": []}


def test_build_records_are_read_for_their_library(tmp_path: Path, cpu_library: Path) -> None:
    shutil.copy2(cpu_library, tmp_path / "libkbit_cpu.so")
    records = tmp_path / "records"
    records.mkdir()
    (records / "libkbit_cpu.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        write_manifest(tmp_path, "1.0", records)
    (records / "libkbit_cpu.json").write_text(json.dumps({"toolkit": {"source": "x"}}))
    assert write_manifest(tmp_path, "1.0", records)["libraries"][0]["toolkit"] is None  # a CPU library has none


def cuda_build_info(real):
    """kbit_build_info() as a CUDA library's says it: the CPU library's, with backend and CUDA changed."""
    def fake(path: Path) -> dict:
        info = real(path)
        return {**info, "backend": "cuda", "cuda": "12.4.131"} if "cuda" in path.name else info
    return fake


def test_a_cuda_entry_takes_its_toolkit_from_the_build_record(tmp_path: Path, cpu_library: Path,
                                                              monkeypatch) -> None:
    import ci.kbit_ci.manifest as writer

    monkeypatch.setattr(writer, "build_info", cuda_build_info(writer.build_info))
    for name in ("libkbit_cpu.so", "libkbit_cuda124.so", "libkbit_cuda130.so"):
        shutil.copy2(cpu_library, tmp_path / name)
    records = tmp_path / "records"
    records.mkdir()
    toolkit = {"source": "container:debian", "version": "12.4.131~12.4.1-2", "image": "kbit-build:cu124"}
    (records / "libkbit_cuda124.json").write_text(json.dumps({"toolkit": toolkit}))
    libs = write_manifest(tmp_path, "1.0", records)["libraries"]
    assert [(e["file"], e["backend"], e["cuda"], e["toolkit"]) for e in libs] == [
        ("libkbit_cpu.so", "cpu", None, None),
        ("libkbit_cuda124.so", "cuda", "12.4", toolkit),
        ("libkbit_cuda130.so", "cuda", "13.0", {"source": "local", "version": "12.4.131"}),  # no record: local
    ]
    m = parse_manifest((tmp_path / "manifest.json").read_text())
    assert [e.toolkit for e in m.cuda_libraries] == ["12.4.131~12.4.1-2 from container:debian", "12.4.131 from local"]


def test_libraries_of_two_abi_versions_are_refused(tmp_path: Path, cpu_library: Path, monkeypatch) -> None:
    import ci.kbit_ci.manifest as writer

    real = writer.build_info
    monkeypatch.setattr(writer, "build_info",
                        lambda path: {**real(path), "abi": 99} if path.name == "libkbit_b.so" else real(path))
    for name in ("libkbit_cpu.so", "libkbit_b.so"):
        shutil.copy2(cpu_library, tmp_path / name)
    abi = own_build_info(cpu_library)["abi"]
    with pytest.raises(ValueError) as info:
        write_manifest(tmp_path, "1.0")
    assert str(info.value) == f"bundled libraries disagree on the ABI version: {sorted([abi, 99])}"
