"""The build report `nox -s build` ends with: a table in the log, dist/report.md and dist/report.png.

Per library of the fat wheel: CUDA version, cubin archs, PTX, library size, zipped size (its
compressed size inside the wheel), build time and toolkit source. The table and the chart are pure
functions over plain data (`rows`, `markdown`, `text_table`, `bar_chart_png`); only `write_report`
reads the wheel and writes files. The PNG is drawn here (bars and a 3x5 pixel font, zlib + struct):
no plotting library in the build session.

    python ci/report.py dist/kbit-*.whl [build/stage]      # rewrite dist/report.{md,png} for a wheel
"""

from __future__ import annotations

import json
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["ReportRow", "bar_chart_png", "coverage", "coverage_markdown", "family", "markdown", "rows", "text_table",
           "write_report"]


@dataclass(frozen=True)
class ReportRow:
    library: str  # "libkbit_cuda124.so"
    cuda: Optional[str]  # "12.4"; None for the CPU library
    archs: tuple[str, ...]
    ptx: tuple[str, ...]
    size: int  # bytes
    zipped: Optional[int]  # bytes inside the wheel (deflated); None if the wheel lacks it
    seconds: Optional[float]  # build time of the row; None for the CPU library (built with the wheel)
    toolkit: str  # "container:debian 12.4.131~12.4.1-2", "local 13.0", "-"

    @property
    def label(self) -> str:
        return f"cu{self.cuda}" if self.cuda else "cpu"


def rows(manifest: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
         compressed: Mapping[str, int]) -> list[ReportRow]:
    """One row per manifest library. `records`: the build records (cuda, seconds, toolkit);
    `compressed`: compressed size by file name inside the wheel."""
    by_cuda = {str(r.get("cuda")): r for r in records}
    out = []
    for e in manifest.get("libraries", []):
        rec = by_cuda.get(str(e.get("cuda"))) if e.get("cuda") else None
        tk = e.get("toolkit") or {}
        toolkit = " ".join(str(x) for x in (tk.get("source"), tk.get("version")) if x) or "-"
        out.append(ReportRow(
            library=e["file"], cuda=e.get("cuda"), archs=tuple(e.get("archs") or ()), ptx=tuple(e.get("ptx") or ()),
            size=int(e["size"]), zipped=compressed.get(e["file"]),
            seconds=None if rec is None or rec.get("seconds") is None else float(rec["seconds"]),
            toolkit=toolkit,
        ))
    return out


# ---------------------------------------------------------------- GPU coverage

# The architecture families, by compute capability (major, minor); every device a row names is shown.
_FAMILIES = ((7, 0, "Volta"), (7, 2, "Volta"), (7, 5, "Turing"), (8, 0, "Ampere"), (8, 6, "Ampere"), (8, 7, "Ampere"),
             (8, 9, "Ada"), (9, 0, "Hopper"), (10, 0, "Blackwell"), (10, 3, "Blackwell"), (11, 0, "Blackwell"),
             (12, 0, "Blackwell"), (12, 1, "Blackwell"))


def family(capability: tuple[int, int]) -> str:
    names = {(a, b): n for a, b, n in _FAMILIES}
    return names.get(capability) or next((n for a, _, n in reversed(_FAMILIES) if a == capability[0]), "?")


def _capability(arch: str) -> Optional[tuple[int, int]]:
    digits = "".join(c for c in arch if c.isdigit())
    return (int(digits[:-1]), int(digits[-1])) if len(digits) >= 2 else None


def coverage(manifest: Mapping[str, Any], devices: Sequence[tuple[int, int]] = ()) -> list[tuple[str, list[str]]]:
    """Rows of the coverage table: per device (every arch the bundled libraries name, plus `devices`),
    its label and one cell per CUDA library: "cubin" (its own), "cubin sm_XY" (an earlier minor's),
    "PTX JIT" or "-". The rules are the runtime's (kbit._policy.how_covered)."""
    src = str(Path(__file__).resolve().parents[1] / "python")
    if src not in sys.path:  # as kbit_ci does: an installed kbit (the same sources, in the test venv) wins
        sys.path.append(src)
    from kbit._policy import how_covered
    from kbit._probes import LibraryEntry
    from kbit._versions import CudaVersion

    libs = [e for e in manifest.get("libraries", []) if e.get("cuda")]
    caps = {c for e in libs for a in (*e.get("archs", ()), *e.get("ptx", ())) if (c := _capability(a))}
    caps |= set(devices)
    entries = [LibraryEntry(e["file"], "cuda", CudaVersion.parse(e["cuda"]), tuple(e.get("archs", ())),
                            tuple(e.get("ptx", ()))) for e in libs]
    out = []
    for cap in sorted(caps):
        cells = []
        for entry in entries:
            how = how_covered(entry, cap)
            if how is None:
                cells.append("-")
            elif how.startswith("PTX"):
                cells.append("PTX JIT")
            else:
                cells.append("cubin" if how == f"cubin sm_{cap[0]}{cap[1]}" else how)
        out.append((f"{family(cap)} sm_{cap[0]}{cap[1]}", cells))
    return out


def coverage_markdown(manifest: Mapping[str, Any], devices: Sequence[tuple[int, int]] = ()) -> list[str]:
    libs = [f"cu{e['cuda']}" for e in manifest.get("libraries", []) if e.get("cuda")]
    if not libs:
        return []
    out = ["", "GPU coverage (how each bundled library runs on each architecture; the runtime's rules):", "",
           "| GPU | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in coverage(manifest, devices)]
    return out


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f} s"


def text_table(rs: Sequence[ReportRow]) -> list[str]:
    """The table as log lines."""
    lines = [f"{'library':<22} {'cuda':<5} {'cubin archs':<32} {'ptx':<5} {'size':>9} {'zipped':>9} "
             f"{'build':>8}  toolkit"]
    for r in rs:
        lines.append(f"{r.library:<22} {r.cuda or '-':<5} {','.join(r.archs) or '-':<32} "
                     f"{','.join(r.ptx) or '-':<5} {_mb(r.size):>9} {_mb(r.zipped):>9} {_s(r.seconds):>8}  {r.toolkit}")
    return lines


def markdown(rs: Sequence[ReportRow], *, wheel: str, wheel_size: int, seconds: float,
             slim: Sequence[tuple[str, int]] = (), chart: Optional[str] = "report.png",
             covered: Sequence[str] = ()) -> str:
    """dist/report.md."""
    out = [
        "# kbit build report",
        "",
        f"Fat wheel `{wheel}`: {_mb(wheel_size)}, {len(rs)} libraries; `nox -s build` took {seconds:.0f} s.",
        "",
        "| library | CUDA | cubin archs | PTX | size | zipped | build time | toolkit |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rs:
        out.append(f"| `{r.library}` | {r.cuda or '-'} | {' '.join(r.archs) or '-'} | {' '.join(r.ptx) or '-'} "
                   f"| {_mb(r.size)} | {_mb(r.zipped)} | {_s(r.seconds)} | {r.toolkit} |")
    total = sum(r.size for r in rs)
    zipped = sum(r.zipped or 0 for r in rs)
    built = sum(r.seconds or 0.0 for r in rs)
    out.append(f"| **total** | | | | {_mb(total)} | {_mb(zipped)} | {_s(built)} | |")
    out += list(covered)
    if slim:
        out += ["", "Slim per-CUDA wheels (same runtime, the CPU library and one CUDA library each):", ""]
        out += [f"- `{name}`: {_mb(size)}" for name, size in slim]
    if chart:
        out += ["", f"![library size (zipped part dark) and build time per library]({chart})"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the chart

# A 3x5 pixel font: five rows of three bits per glyph, top to bottom. Text is drawn upper-case; a
# character without a glyph is drawn as a space.
_FONT = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 111 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 001 001 001", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "(": "010 100 100 100 010", ")": "010 001 001 001 010", "/": "001 001 010 100 100",
    ":": "000 010 000 010 000", ",": "000 000 000 010 100", " ": "000 000 000 000 000",
    "A": "010 101 111 101 101", "B": "110 101 110 101 110", "C": "011 100 100 100 011",
    "D": "110 101 101 101 110", "E": "111 100 110 100 111", "F": "111 100 110 100 100",
    "G": "011 100 101 101 011", "H": "101 101 111 101 101", "I": "111 010 010 010 111",
    "J": "001 001 001 101 010", "K": "101 101 110 101 101", "L": "100 100 100 100 111",
    "M": "101 111 111 101 101", "N": "110 101 101 101 101", "O": "010 101 101 101 010",
    "P": "110 101 110 100 100", "Q": "010 101 101 110 011", "R": "110 101 110 101 101",
    "S": "011 100 010 001 110", "T": "111 010 010 010 010", "U": "101 101 101 101 111",
    "V": "101 101 101 101 010", "W": "101 101 111 111 101", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010", "Z": "111 001 010 100 111",
}

_WHITE = (255, 255, 255)
_INK = (40, 40, 40)
_GRID = (225, 225, 225)
_SIZE = (140, 180, 230)
_ZIPPED = (40, 90, 170)
_TIME = (235, 150, 60)


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(_WHITE * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.w, x + w), min(self.h, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        line = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            i = (yy * self.w + x0) * 3
            self.px[i:i + len(line)] = line

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = _INK, scale: int = 2) -> int:
        """Draw `s` with its top-left at (x, y); returns the x after it."""
        for ch in s.upper():
            rows_ = _FONT.get(ch, _FONT[" "]).split()
            for dy, bits in enumerate(rows_):
                for dx, bit in enumerate(bits):
                    if bit == "1":
                        self.rect(x + dx * scale, y + dy * scale, scale, scale, color)
            x += 4 * scale
        return x

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 4 * scale


def bar_chart_png(rs: Sequence[ReportRow]) -> bytes:
    """Two panels of horizontal bars, one line per library: its size (the zipped part dark) and its
    build time."""
    row_h, top, left, panel_w, gap, value_w = 26, 40, 90, 330, 40, 110
    width = left + 2 * (panel_w + value_w) + gap + 10
    height = top + row_h * max(1, len(rs)) + 14
    c = _Canvas(width, height)
    max_size = max([r.size for r in rs] + [1])
    max_time = max([r.seconds or 0.0 for r in rs] + [1e-9])
    size_x = left
    time_x = left + panel_w + value_w + gap
    c.text(size_x, 10, "LIBRARY SIZE MB (DARK: ZIPPED)")
    c.text(time_x, 10, "BUILD TIME S")
    for x0 in (size_x, time_x):
        for k in range(5):
            c.rect(x0 + k * panel_w // 4, top - 6, 1, row_h * max(1, len(rs)) + 6, _GRID)
    for i, r in enumerate(rs):
        y = top + i * row_h
        c.text(8, y + 6, r.label)
        w = max(1, round(panel_w * r.size / max_size))
        c.rect(size_x, y + 3, w, row_h - 8, _SIZE)
        if r.zipped is not None:
            c.rect(size_x, y + 3, max(1, round(panel_w * r.zipped / max_size)), row_h - 8, _ZIPPED)
        c.text(size_x + w + 6, y + 6, f"{r.size / 1e6:.2f}")
        if r.seconds is not None:
            tw = max(1, round(panel_w * r.seconds / max_time))
            c.rect(time_x, y + 3, tw, row_h - 8, _TIME)
            c.text(time_x + tw + 6, y + 6, f"{r.seconds:.1f}")
        else:
            c.text(time_x + 4, y + 6, "-")
    return c.png()


# ---------------------------------------------------------------- I/O at the edge


def read_records(stage: Path) -> list[dict[str, Any]]:
    """The build records staged beside the CUDA libraries (build/stage/libkbit_cudaXY.json)."""
    return [json.loads(p.read_text()) for p in sorted(stage.glob("libkbit_cuda*.json"))]


# Devices shown even where no library names their arch: the later minors that run earlier cubins.
_NOTABLE_DEVICES = ((8, 7), (10, 3), (12, 1))


def write_report(wheel: Path, records: Sequence[Mapping[str, Any]], out_dir: Path, seconds: float,
                 slim: Sequence[Path] = (), unbuilt: Sequence[str] = ()) -> tuple[list[str], Path]:
    """Read the wheel, write out_dir/report.md and report.png; returns the log lines and the .md path."""
    with zipfile.ZipFile(wheel) as z:
        manifest = json.loads(z.read("kbit/manifest.json"))
        compressed = {Path(i.filename).name: i.compress_size for i in z.infolist()
                      if i.filename.startswith("kbit/libkbit_")}
    rs = rows(manifest, records, compressed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.png").write_bytes(bar_chart_png(rs))
    md = out_dir / "report.md"
    md.write_text(markdown(rs, wheel=wheel.name, wheel_size=wheel.stat().st_size, seconds=seconds,
                           slim=[(p.name, p.stat().st_size) for p in slim],
                           covered=[*coverage_markdown(manifest, _NOTABLE_DEVICES),
                                    *(["", "```", *unbuilt, "```"] if unbuilt else [])]))
    lines = [*text_table(rs), f"wheel: {wheel.name} ({_mb(wheel.stat().st_size)}), total {seconds:.0f} s"]
    lines += [f"slim:  {p.name} ({_mb(p.stat().st_size)})" for p in slim]
    lines.append(f"report: {md} and {out_dir / 'report.png'}")
    return lines, md


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    wheel = Path(argv[0])
    records = read_records(Path(argv[1])) if len(argv) == 2 else []
    lines, _ = write_report(wheel, records, wheel.parent, 0.0, sorted((wheel.parent / "slim").glob("kbit-*.whl")))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
