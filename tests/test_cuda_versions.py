"""CUDA versions as the runtime and the build read them: the accepted spellings, the integers the
driver reports, the library names, and the values refused (each refusal says what it got)."""

from __future__ import annotations

import re

import pytest
from kbit._versions import CudaVersion, cpu_library_name, cuda_library_name, parse_library_name


@pytest.mark.parametrize(("text", "major", "minor"), [
    ("12.4", 12, 4), ("12.4.1", 12, 4), ("12.4.1.7", 12, 4), ("124", 12, 4), ("cu124", 12, 4),
    ("CU124", 12, 4), ("  cu11.8\n", 11, 8), ("13.0", 13, 0), ("130", 13, 0), ("1.0", 1, 0),
    ("99.9", 99, 9), ("Cu13.1", 13, 1),
])
def test_parse_accepts_dotted_packed_and_cu_prefixed_spellings(text: str, major: int, minor: int) -> None:
    assert CudaVersion.parse(text) == CudaVersion(major, minor)


@pytest.mark.parametrize("text", [
    "", "12", "12.", ".4", "1240", "12.4cu", "124cu", "12,4", "v12.4", "12.4.",
    "cu", "12.a", "1 2.4",
])
def test_parse_refuses_anything_else_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a CUDA version: .*expected e\.g\. '12\.4' or '124'") as e:
        CudaVersion.parse(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize(("text", "shown"), [("12.10", "12.10"), ("100.0", "100.0"), ("0.4", "0.4"), ("004", "0.4")])
def test_parse_refuses_numbers_out_of_range(text: str, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"^not a CUDA version: {re.escape(shown)}$"):
        CudaVersion.parse(text)


@pytest.mark.parametrize(("major", "minor"), [(0, 0), (0, 5), (-1, 0), (100, 0), (12, 10), (12, -1)])
def test_out_of_range_versions_are_refused(major: int, minor: int) -> None:
    with pytest.raises(ValueError, match=rf"^not a CUDA version: {major}\.{minor}$"):
        CudaVersion(major, minor)


@pytest.mark.parametrize(("major", "minor"), [(1, 0), (99, 9), (99, 0), (1, 9), (12, 4)])
def test_range_edges_are_versions(major: int, minor: int) -> None:
    v = CudaVersion(major, minor)
    assert (v.major, v.minor, str(v), v.tag) == (major, minor, f"{major}.{minor}", f"{major}{minor}")


@pytest.mark.parametrize(("value", "major", "minor"), [
    (12040, 12, 4), (13000, 13, 0), (11080, 11, 8), (12090, 12, 9), (12095, 12, 9), (13010, 13, 1),
    (99090, 99, 9), (1000, 1, 0),
])
def test_from_int_reads_the_driver_api_integer(value: int, major: int, minor: int) -> None:
    v = CudaVersion.from_int(value)
    assert type(v.major) is int and type(v.minor) is int
    assert v == CudaVersion(major, minor)


@pytest.mark.parametrize("value", [0, 999, 100000])
def test_from_int_refuses_integers_that_are_no_version(value: int) -> None:
    with pytest.raises(ValueError, match="not a CUDA version"):
        CudaVersion.from_int(value)


def test_versions_order_by_major_then_minor() -> None:
    vs = [CudaVersion.parse(s) for s in ("13.0", "11.8", "12.1", "12.4", "12.5")]
    assert sorted(vs) == [CudaVersion(11, 8), CudaVersion(12, 1), CudaVersion(12, 4), CudaVersion(12, 5),
                          CudaVersion(13, 0)]


@pytest.mark.parametrize("text", ["11.8", "12.4", "12.5", "13.0", "13.5", "99.9", "1.0"])
def test_library_names_round_trip(text: str) -> None:
    v = CudaVersion.parse(text)
    name = cuda_library_name(v)
    assert name == f"libkbit_cuda{v.major}{v.minor}.so"
    parsed = parse_library_name(name)
    assert parsed == v and type(parsed.major) is int and type(parsed.minor) is int


@pytest.mark.parametrize("name", [
    cpu_library_name(), "libkbit_cuda.so", "libkbit_cuda1.so", "libkbit_cuda124.so.1", "xlibkbit_cuda124.so",
    "libkbit_cuda12a.so", "libkbit_cuda124.dylib", "libkbit_cuda124so", "",
])
def test_parse_library_name_is_none_for_anything_else(name: str) -> None:
    assert parse_library_name(name) is None


def test_parse_library_name_refuses_a_name_of_no_version() -> None:
    with pytest.raises(ValueError, match=r"^not a CUDA version: 0\.4$"):
        parse_library_name("libkbit_cuda004.so")


def test_cpu_library_name() -> None:
    assert cpu_library_name() == "libkbit_cpu.so"
