"""The build report (ci/report.py): pure functions over a fake manifest and build records, the PNG
decoded back, and the report `nox -s build` wrote for the wheel in dist/."""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

from report import ReportRow, bar_chart_png, coverage, coverage_markdown, family, markdown, rows, text_table  # noqa: E402

MANIFEST = {"libraries": [
    {"file": "libkbit_cpu.so", "cuda": None, "archs": [], "ptx": [], "size": 90_000, "toolkit": None},
    {"file": "libkbit_cuda118.so", "cuda": "11.8", "archs": ["70", "90"], "ptx": ["90"], "size": 1_400_000,
     "toolkit": {"source": "container:debian", "version": "11.8.89~11.8.0-5~deb12u1"}},
    {"file": "libkbit_cuda130.so", "cuda": "13.0", "archs": ["75", "120"], "ptx": ["120"], "size": 2_800_000,
     "toolkit": {"source": "container:pypi", "version": "13.0.88"}},
]}
RECORDS = [{"cuda": "11.8", "seconds": 20.0}, {"cuda": "13.0", "seconds": 40.5}, {"cuda": "12.4", "seconds": 9.0}]
COMPRESSED = {"libkbit_cpu.so": 40_000, "libkbit_cuda118.so": 630_000, "libkbit_cuda130.so": 1_300_000}


def _decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, RGB rows) of an 8-bit RGB, filter-0 PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kind == b"IEND"
    width, height, depth, color, *_ = ihdr
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    lines = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(line[0] == 0 for line in lines)
    return width, height, [line[1:] for line in lines]


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


def test_bar_chart_draws_proportional_bars():
    rs = rows(MANIFEST, RECORDS, COMPRESSED)
    width, height, lines = _decode_png(bar_chart_png(rs))
    assert width > 600 and height == 40 + 26 * 3 + 14

    def run_length(y: int, color: bytes, start: int = 0) -> int:
        line, n = lines[y], 0
        x = next(i for i in range(start, width) if line[3 * i:3 * i + 3] == color)
        while x + n < width and line[3 * (x + n):3 * (x + n) + 3] == color:
            n += 1
        return n

    size_color, zipped_color, time_color = bytes((140, 180, 230)), bytes((40, 90, 170)), bytes((235, 150, 60))
    mid = [40 + 26 * i + 12 for i in range(3)]
    # the largest library spans the whole panel; the others in proportion (within a pixel)
    zipped = [run_length(y, zipped_color) for y in mid]
    light = [run_length(y, size_color) for y in mid]
    full = [z + s for z, s in zip(zipped, light)]
    assert full[2] == 330
    assert abs(full[1] - 330 * 1.4 / 2.8) <= 1 and abs(zipped[1] - 330 * 0.63 / 2.8) <= 1
    times = [run_length(y, time_color) for y in mid[1:]]
    assert times[1] == 330 and abs(times[0] - 330 * 20.0 / 40.5) <= 1
    assert time_color not in lines[mid[0]]  # the CPU library has no build time: no bar


def test_bar_chart_of_nothing_is_still_a_png():
    width, height, _ = _decode_png(bar_chart_png([]))
    assert width > 0 and height > 0


@pytest.mark.skipif(not os.environ.get("KBIT_WHEEL"), reason="KBIT_WHEEL is not set (nox -s tests sets it)")
def test_nox_build_wrote_the_report():
    dist = Path(os.environ["KBIT_WHEEL"]).parent
    md = (dist / "report.md").read_text()
    assert Path(os.environ["KBIT_WHEEL"]).name in md
    assert "| `libkbit_cpu.so` |" in md and "![" in md
    _decode_png((dist / "report.png").read_bytes())


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
