"""The build report (ci/report.py): pure functions over a fake manifest and build records, the PNG
decoded back, and the report `nox -s build` wrote for the wheel in dist/."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from ci.report import ReportRow, coverage, coverage_markdown, family, markdown, rows, text_table

REPO = Path(__file__).resolve().parents[1]


MANIFEST = {"libraries": [
    {"file": "libkbit_cpu.so", "cuda": None, "archs": [], "ptx": [], "size": 90_000, "toolkit": None},
    {"file": "libkbit_cuda118.so", "cuda": "11.8", "archs": ["70", "90"], "ptx": ["90"], "size": 1_400_000,
     "toolkit": {"source": "container:debian", "version": "11.8.89~11.8.0-5~deb12u1"}},
    {"file": "libkbit_cuda130.so", "cuda": "13.0", "archs": ["75", "120"], "ptx": ["120"], "size": 2_800_000,
     "toolkit": {"source": "container:pypi", "version": "13.0.88"}},
]}
RECORDS = [{"cuda": "11.8", "seconds": 20.0}, {"cuda": "13.0", "seconds": 40.5}, {"cuda": "12.4", "seconds": 9.0}]
COMPRESSED = {"libkbit_cpu.so": 40_000, "libkbit_cuda118.so": 630_000, "libkbit_cuda130.so": 1_300_000}


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, its chunks' CRCs checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size = 8, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        pos += 12 + length
    assert kind == b"IEND" and size is not None
    return size


def test_rows_join_manifest_records_and_zip_sizes():
    rs = rows(MANIFEST, RECORDS, COMPRESSED)
    assert [r.label for r in rs] == ["cpu", "cu11.8", "cu13.0"]
    cpu, cu118, cu130 = rs
    assert cpu.seconds is None and cpu.toolkit == "-" and cpu.zipped == 40_000
    assert cu118 == ReportRow("libkbit_cuda118.so", "11.8", ("70", "90"), ("90",), 1_400_000, 630_000, 20.0,
                              "container:debian 11.8.89~11.8.0-5~deb12u1")
    assert cu130.seconds == 40.5 and cu130.toolkit == "container:pypi 13.0.88"
    # a record without a library in the wheel (12.4 here) adds no row; a library without a record has no time
    assert rows(MANIFEST, [], {})[1].seconds is None and rows(MANIFEST, [], {})[1].zipped is None


def test_text_table():
    lines = text_table(rows(MANIFEST, RECORDS, COMPRESSED))
    assert lines[0].split()[:4] == ["library", "cuda", "cubin", "archs"]
    assert "libkbit_cuda130.so     13.0  75,120" in lines[3]
    assert "2.80 MB" in lines[3] and "1.30 MB" in lines[3] and "40.5 s" in lines[3]
    assert lines[1].rstrip().endswith("-")


def test_markdown():
    md = markdown(rows(MANIFEST, RECORDS, COMPRESSED), wheel="kbit-0.2.0-py3-none-x.whl", wheel_size=2_900_000,
                  seconds=61.2, slim=[("kbit-0.2.0+cu118-py3-none-x.whl", 800_000)])
    lines = md.splitlines()
    assert lines[0] == "# kbit build report"
    assert "`kbit-0.2.0-py3-none-x.whl`: 2.90 MB, 3 libraries; `nox -s build` took 61 s." in md
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3 + 1  # header, rule, a row per library, the total
    assert table[3] == ("| `libkbit_cuda118.so` | 11.8 | 70 90 | 90 | 1.40 MB | 0.63 MB | 20.0 s "
                        "| container:debian 11.8.89~11.8.0-5~deb12u1 |")
    assert table[-1] == "| **total** | | | | 4.29 MB | 1.97 MB | 60.5 s | |"
    assert "- `kbit-0.2.0+cu118-py3-none-x.whl`: 0.80 MB" in md
    assert md.rstrip().endswith("(report.png)")


def test_the_chart_draws_proportional_bars_and_the_coverage_grid() -> None:
    pytest.importorskip("matplotlib")
    from ci.report import chart, chart_png

    rs = rows(MANIFEST, RECORDS, COMPRESSED)
    covered = coverage({"libraries": [e for e in MANIFEST["libraries"]]})
    fig = chart(rs, covered)
    size_ax, time_ax, grid_ax = fig.axes[:3]
    sizes = [p.get_width() for p in size_ax.patches]
    assert sizes[:3] == [r.size / 1e6 for r in rs] and sizes[3:] == [(r.zipped or 0) / 1e6 for r in rs]
    assert [p.get_width() for p in time_ax.patches] == [0.0, 20.0, 40.5]  # the CPU library: no build time
    assert [t.get_text() for t in size_ax.get_yticklabels()] == ["cpu", "cu11.8", "cu13.0"]
    grid = grid_ax.get_images()[0].get_array()
    assert grid.shape == (len(covered), 2)
    width, height = _png_size(chart_png(rs, covered))
    assert width == 1300 and height >= 350
    assert chart_png(rs, covered) == chart_png(rs, covered)  # no timestamp: the same input, the same bytes


@pytest.mark.skipif(not os.environ.get("KBIT_WHEEL"), reason="KBIT_WHEEL is not set (nox -s tests sets it)")
def test_nox_build_wrote_the_report():
    dist = Path(os.environ["KBIT_WHEEL"]).parent
    md = (dist / "report.md").read_text()
    assert Path(os.environ["KBIT_WHEEL"]).name in md
    assert "| `libkbit_cpu.so` |" in md and "![" in md
    _png_size((dist / "report.png").read_bytes())


COVERAGE_MANIFEST = {"libraries": [
    {"file": "libkbit_cpu.so", "cuda": None, "archs": [], "ptx": []},
    {"file": "libkbit_cuda118.so", "cuda": "11.8", "archs": ["70", "80", "90"], "ptx": ["90"]},
    {"file": "libkbit_cuda130.so", "cuda": "13.0", "archs": ["75", "80", "100", "120"], "ptx": ["120"]},
]}


def test_coverage_says_how_each_library_runs_on_each_gpu() -> None:
    table = dict(coverage(COVERAGE_MANIFEST, devices=[(8, 6), (12, 1)]))
    assert list(table) == ["Volta sm_70", "Turing sm_75", "Ampere sm_80", "Ampere sm_86", "Hopper sm_90",
                           "Blackwell sm_100", "Blackwell sm_120", "Blackwell sm_121"]
    assert table["Volta sm_70"] == ["cubin", "-"]  # CUDA 13 dropped Volta
    assert table["Turing sm_75"] == ["cubin sm_70", "cubin"]
    assert table["Ampere sm_86"] == ["cubin sm_80", "cubin sm_80"]  # an earlier minor's cubin
    assert table["Blackwell sm_100"] == ["PTX JIT", "cubin"]
    assert table["Blackwell sm_121"] == ["PTX JIT", "cubin sm_120"]
    md = coverage_markdown(COVERAGE_MANIFEST)
    assert "| GPU | cu11.8 | cu13.0 |" in md and "| Hopper sm_90 | cubin | - |" in md


def test_family_names() -> None:
    assert [family(c) for c in [(7, 0), (7, 5), (8, 9), (9, 0), (10, 3), (12, 1)]] == [
        "Volta", "Turing", "Ada", "Hopper", "Blackwell", "Blackwell"]


def test_a_rebuild_that_changed_nothing_keeps_the_real_build_time() -> None:
    from ci.kbit_ci.build_row import real_build_time

    assert real_build_time("abc", 0.4, None) == (0.4, False)
    assert real_build_time("abc", 0.4, {"sha256": "abc", "seconds": 114.0}) == (114.0, True)
    assert real_build_time("abd", 47.0, {"sha256": "abc", "seconds": 114.0}) == (47.0, False)
    r = ReportRow("libkbit_cuda131.so", "13.1", ("75",), ("75",), 1, 1, 114.0, "container:pypi 13.1.115", cached=True)
    assert "114.0 s (cached)" in markdown([r], wheel="w.whl", wheel_size=1, seconds=7.0, chart=None)


def test_the_chart_of_nothing_is_still_a_png() -> None:
    pytest.importorskip("matplotlib")
    from ci.report import chart_png

    assert _png_size(chart_png([], []))[0] == 1300
