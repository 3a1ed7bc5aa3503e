"""The runtime's reading of manifest.json (kbit._probes.parse_manifest / probe_manifest): every field it
takes, what it does with an odd value, and the exact one-line error of each corrupt manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
from kbit._probes import LibraryEntry, Manifest, driver_branch, parse_manifest, probe_manifest
from kbit._versions import CudaVersion

BASE = {"schema": 1, "kbit_version": "0.1.0", "abi": 3, "libraries": []}
CPU = {"file": "libkbit_cpu.so", "backend": "cpu"}
CU124 = {"file": "libkbit_cuda124.so", "backend": "cuda", "cuda": "12.4"}


def text(*libraries: object, **top: object) -> str:
    return json.dumps({**BASE, **top, "libraries": list(libraries)})


def test_a_full_entry_is_read_field_by_field() -> None:
    full = {**CU124, "archs": ["70", "80", "90a"], "ptx": ["90"], "sha256": "cd" * 32, "size": 456,
            "compiler": "nvcc 12.4.131", "host_compiler": "g++-13 13.3.0",
            "toolkit": {"source": "container:debian", "version": "12.4.131~12.4.1-2", "image": "kbit-build:cu124"}}
    m = parse_manifest(text(CPU, full, note="built without 11.8"), "/pkg/manifest.json")
    assert m == Manifest("/pkg/manifest.json", (
        LibraryEntry("libkbit_cpu.so", "cpu", None, (), ()),
        LibraryEntry("libkbit_cuda124.so", "cuda", CudaVersion(12, 4), ("70", "80", "90a"), ("90",), "cd" * 32, 456,
                     "nvcc 12.4.131", "12.4.131~12.4.1-2 from container:debian"),
    ), "0.1.0", 3, note="built without 11.8")
    assert m.ok and m.entry("libkbit_cuda124.so") is m.libraries[1] and m.entry("libkbit_cuda118.so") is None


def test_the_path_defaults_to_the_manifest_name() -> None:
    assert parse_manifest(text()).path == "manifest.json"
    assert parse_manifest("{").error.startswith("manifest.json is corrupt (")


@pytest.mark.parametrize(("field", "value"), [
    ("sha256", 12), ("sha256", None), ("size", "456"), ("size", 4.5), ("compiler", ["nvcc"]), ("toolkit", "local"),
    ("toolkit", {}), ("toolkit", {"image": "x"}), ("toolkit", {"version": "", "source": ""}),
])
def test_optional_fields_of_the_wrong_kind_are_unknown(field: str, value: object) -> None:
    e = parse_manifest(text({**CU124, field: value})).libraries[0]
    assert getattr(e, {"sha256": "sha256", "size": "size", "compiler": "compiler", "toolkit": "toolkit"}[field]) is None


@pytest.mark.parametrize(("toolkit", "line"), [
    ({"version": "12.4.131", "source": "pypi"}, "12.4.131 from pypi"),
    ({"version": "12.4.131"}, "12.4.131"),
    ({"source": "local"}, "local"),
    ({"version": 13, "source": "local"}, "13 from local"),
])
def test_the_toolkit_is_one_line(toolkit: dict, line: str) -> None:
    assert parse_manifest(text({**CU124, "toolkit": toolkit})).libraries[0].toolkit == line


@pytest.mark.parametrize(("top", "abi", "version", "note"), [
    ({"abi": "3"}, None, "0.1.0", None),
    ({"abi": None, "kbit_version": None}, None, None, None),
    ({"note": ""}, 3, "0.1.0", None),
    ({"note": 5}, 3, "0.1.0", None),
    ({"note": "x" * 600}, 3, "0.1.0", "x" * 500),
])
def test_top_level_fields(top: dict, abi: Optional[int], version: Optional[str], note: Optional[str]) -> None:
    m = parse_manifest(text(**top))
    assert (m.ok, m.abi, m.kbit_version, m.note) == (True, abi, version, note)


def test_cuda_libraries_are_the_cuda_entries_lowest_version_first() -> None:
    libs = [{**CU124, "file": f"libkbit_cuda{t}.so", "cuda": v} for t, v in (("130", "13.0"), ("118", "11.8"),
                                                                            ("124", "12.4"))]
    m = parse_manifest(text(libs[0], CPU, libs[1], libs[2]))
    assert [e.file for e in m.cuda_libraries] == ["libkbit_cuda118.so", "libkbit_cuda124.so", "libkbit_cuda130.so"]
    assert [e.file for e in m.libraries] == ["libkbit_cuda130.so", "libkbit_cpu.so", "libkbit_cuda118.so",
                                             "libkbit_cuda124.so"]


CORRUPT = [
    ("not-json", "{", "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("top-level-list", "[]", "ValueError: the top level is not an object"),
    ("schema-2", json.dumps({**BASE, "schema": 2}),
     "ValueError: schema 2 is not 1: this kbit runtime does not match the libraries it was installed with"),
    ("schema-missing", json.dumps({"libraries": []}), "ValueError: schema None is not 1: this kbit runtime"),
    ("schema-string", json.dumps({**BASE, "schema": "1"}), "ValueError: schema '1' is not 1: this kbit runtime"),
    ("libraries-missing", json.dumps({"schema": 1}), "ValueError: 'libraries' is not a list"),
    ("libraries-object", json.dumps({**BASE, "libraries": {}}), "ValueError: 'libraries' is not a list"),
    ("entry-not-object", text("x"), "ValueError: libraries[0] is not an object"),
    ("file-missing", text({"backend": "cpu"}), "ValueError: libraries[0].file must be a file name, got None"),
    ("file-empty", text({**CPU, "file": ""}), "ValueError: libraries[0].file must be a file name, got ''"),
    ("file-path", text({**CPU, "file": "a/b.so"}), "ValueError: libraries[0].file must be a file name, got 'a/b.so'"),
    ("file-number", text({**CPU, "file": 3}), "ValueError: libraries[0].file must be a file name, got 3"),
    ("backend-rocm", text({**CPU, "backend": "rocm"}),
     "ValueError: libraries[0].backend must be 'cpu' or 'cuda', got 'rocm'"),
    ("backend-missing", text({"file": "x.so"}), "ValueError: libraries[0].backend must be 'cpu' or 'cuda', got None"),
    ("cuda-missing", text({**CU124, "cuda": None}),
     "ValueError: libraries[0] (libkbit_cuda124.so) is a CUDA library without a 'cuda' version"),
    ("cuda-number", text({**CU124, "cuda": 12.4}),
     "ValueError: libraries[0] (libkbit_cuda124.so) is a CUDA library without a 'cuda' version"),
    ("cuda-bad", text({**CU124, "cuda": "twelve"}),
     "ValueError: not a CUDA version: 'twelve' (expected e.g. '12.4' or '124')"),
    ("archs-string", text({**CU124, "archs": "80"}), "ValueError: libraries[0].archs must be a list of strings"),
    ("archs-numbers", text({**CU124, "archs": [80]}), "ValueError: libraries[0].archs must be a list of strings"),
    ("ptx-null", text({**CPU, "ptx": None}), "ValueError: libraries[0].ptx must be a list of strings"),
    ("second-entry", text(CPU, {"file": "y.so", "backend": "x"}),
     "ValueError: libraries[1].backend must be 'cpu' or 'cuda', got 'x'"),
    ("nested-too-deep", "[" * 100000, "RecursionError: maximum recursion depth exceeded"),
]


@pytest.mark.parametrize(("name", "body", "why"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_a_corrupt_manifest_is_an_error_value_naming_the_fault(name: str, body: str, why: str) -> None:
    m = parse_manifest(body, "/pkg/manifest.json")
    assert m.path == "/pkg/manifest.json"
    assert not m.ok and m.libraries == () and m.kbit_version is None and m.abi is None
    assert m.error.startswith(f"/pkg/manifest.json is corrupt ({why}")
    assert m.error.endswith("): reinstall kbit")


def test_the_fault_is_cut_to_200_characters() -> None:
    m = parse_manifest(text({**CPU, "file": "a/" + "x" * 400}))
    inner = m.error.removeprefix("manifest.json is corrupt (ValueError: ").removesuffix("): reinstall kbit")
    assert len(inner) == 200 and inner.startswith("libraries[0].file must be a file name, got 'a/xxx")


def test_probe_manifest_reads_the_package_directory(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(text(CPU))
    m = probe_manifest(tmp_path)
    assert m.ok and m.path == str(tmp_path / "manifest.json") and [e.file for e in m.libraries] == ["libkbit_cpu.so"]


def test_probe_manifest_missing(tmp_path: Path) -> None:
    assert probe_manifest(tmp_path).path == str(tmp_path / "manifest.json")
    assert probe_manifest(tmp_path).error == (
        f"{tmp_path}/manifest.json is missing: reinstall kbit (pip install --force-reinstall kbit), "
        "or in a source checkout build the libraries and write the manifest")


def test_probe_manifest_too_big(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b" " * ((1 << 20) + 1))
    assert probe_manifest(tmp_path).path == str(tmp_path / "manifest.json")
    assert probe_manifest(tmp_path).error == (
        f"{tmp_path}/manifest.json is corrupt (1048577 bytes; a manifest is a few KB): reinstall kbit")
    (tmp_path / "manifest.json").write_bytes(text().encode().ljust(1 << 20))
    assert probe_manifest(tmp_path).ok  # exactly the limit is read


def test_probe_manifest_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b'{"schema": 1, \xff}')
    assert probe_manifest(tmp_path).path == str(tmp_path / "manifest.json")
    error = probe_manifest(tmp_path).error
    assert error.startswith(f"{tmp_path}/manifest.json is corrupt (not UTF-8: 'utf-8' codec can't decode byte 0xff")
    assert error.endswith("): reinstall kbit")


def test_probe_manifest_unreadable(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").mkdir()
    assert probe_manifest(tmp_path).path == str(tmp_path / "manifest.json")
    error = probe_manifest(tmp_path).error
    assert error.startswith(f"{tmp_path}/manifest.json cannot be read ([Errno 21] Is a directory")


def _maps(tmp_path: Path, *paths: str) -> Path:
    maps = tmp_path / "maps"
    lines = [f"7f{i:02x}0-7f{i:02x}1 r-xp 00000000 08:01 4{i}    {p}" for i, p in enumerate(paths)]
    maps.write_text("\n".join([*lines, "7f990-7f991 rw-p 00000000 00:00 0 ", "7fa00-7fa01 r-xp 0 08:01 9 /lib/libc.so.6"])
                    + "\n")
    return maps


@pytest.mark.parametrize(("files", "proc", "branch"), [
    (["libcuda.so.550.54.15"], None, 550),
    (["libcuda.so.1050.1"], None, 1050),
    (["libcuda.so.1"], "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 2024\n", 535),
    (["libcuda.so.1"], "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n", 580),
    (["libcuda.so.1"], "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  1010.12  Release\n", 1010),
    (["libcuda.so.1"], None, None),  # e.g. WSL: nothing says, so unknown, never guessed
    (["libcuda.so.1"], "garbage", None),
    (["libcuda.so.1"], "Kernel Module 55.1", None),
    (["libcuda.so.575.1", "libcuda.so.550.54.15"], None, 575),  # two mapped: the first path, sorted
    ([], "Kernel Module  560.35.03", 560),
])
def test_driver_branch(tmp_path: Path, files: list[str], proc: Optional[str], branch: Optional[int]) -> None:
    links = []
    for i, name in enumerate(files):
        (tmp_path / name).write_bytes(b"")
        link = tmp_path / f"lib{i}" / "libcuda.so.1"
        link.parent.mkdir()
        link.symlink_to(tmp_path / name)
        links.append(str(link))
    version = tmp_path / "version"
    if proc is not None:
        version.write_text(proc)
    assert driver_branch(str(_maps(tmp_path, *links)), str(version)) == branch


def test_driver_branch_without_maps_reads_the_kernel_module(tmp_path: Path) -> None:
    (tmp_path / "version").write_text("Kernel Module  570.86.10\n")
    assert driver_branch(str(tmp_path / "absent"), str(tmp_path / "version")) == 570
    assert driver_branch(str(tmp_path / "absent"), str(tmp_path / "absent")) is None


def test_driver_branch_reads_paths_with_spaces_and_odd_bytes(tmp_path: Path) -> None:
    real = tmp_path / "libcuda.so.550.54.15"
    real.write_bytes(b"")
    link = tmp_path / "my drivers" / "libcuda.so.1"  # the mapped name: a link in a folder with a space
    link.parent.mkdir()
    link.symlink_to(real)
    maps = tmp_path / "maps"
    maps.write_bytes(b"7f00-7f01 r-xp 00000000 08:01 42    " + str(link).encode() + b"\n"
                     b"7f02-7f03 r-xp 00000000 08:01 43    /opt/\xff\xfe/libfoo.so\n"
                     b"libcuda.so truncated line\n")
    assert driver_branch(str(maps), str(tmp_path / "absent")) == 550


def test_driver_branch_reads_a_kernel_module_version_with_odd_bytes(tmp_path: Path) -> None:
    (tmp_path / "version").write_bytes(b"NVRM \xff version: NVIDIA UNIX x86_64 Kernel Module  535.183.01 \xfe\n")
    (tmp_path / "maps").write_bytes(b"libcuda.so\n7f00-7f01 r-xp 0 08:01 42 /x/\xff/libcuda.so.1\n")
    assert driver_branch(str(tmp_path / "maps"), str(tmp_path / "version")) == 535
