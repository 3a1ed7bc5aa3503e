"""The build report `nox -s build` ends with: a table in the log, dist/report.md and dist/report.png.

Per library of the fat wheel: CUDA version, cubin archs, PTX, library size, zipped size (its
compressed size inside the wheel), build time (the real one: a cached rebuild keeps the time of the
build that made the file) and toolkit source, and the GPU coverage of every bundled library. The
tables and the chart are functions over plain data (`rows`, `markdown`, `text_table`, `coverage`,
`chart`); only `write_report` reads the wheel and writes files. The chart is drawn with matplotlib,
installed in the build session only (never a runtime dependency).

    python -m ci.report dist/kbit-*.whl [build/stage]      # rewrite dist/report.{md,png} for a wheel

`nox -s build` runs it in its session (ci.build, where matplotlib is installed).
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["ReportRow", "chart", "chart_png", "coverage", "coverage_markdown", "family", "markdown", "rows",
           "text_table", "write_report"]


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
    cached: bool = False  # nothing was rebuilt this time: `seconds` is the build that made the file

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
            toolkit=toolkit, cached=bool(rec and rec.get("cached")),
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
    from kbit._manifest import LibraryEntry
    from kbit._policy import how_covered
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


def _s(x: Optional[float], cached: bool = False) -> str:
    return "-" if x is None else f"{x:.1f} s" + (" (cached)" if cached else "")


def text_table(rs: Sequence[ReportRow]) -> list[str]:
    """The table as log lines."""
    lines = [f"{'library':<22} {'cuda':<5} {'cubin archs':<32} {'ptx':<5} {'size':>9} {'zipped':>9} "
             f"{'build':>14}  toolkit"]
    for r in rs:
        lines.append(f"{r.library:<22} {r.cuda or '-':<5} {','.join(r.archs) or '-':<32} "
                     f"{','.join(r.ptx) or '-':<5} {_mb(r.size):>9} {_mb(r.zipped):>9} {_s(r.seconds, r.cached):>14}  {r.toolkit}")
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
                   f"| {_mb(r.size)} | {_mb(r.zipped)} | {_s(r.seconds, r.cached)} | {r.toolkit} |")
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

_SIZE, _ZIPPED, _TIME, _CACHED = "#8cb4e6", "#285aaa", "#eb963c", "#f5cfa3"
_CELL_COLOR = {"cubin": "#3c8c50", "older cubin": "#9ccc8c", "PTX JIT": "#f0c850", "-": "#e6e6e6"}


def _cell_kind(cell: str) -> str:
    return "older cubin" if cell.startswith("cubin sm_") else cell


def chart(rs: Sequence[ReportRow], covered: Sequence[tuple[str, list[str]]]) -> Any:
    """The report's picture (a matplotlib Figure, drawn off-screen): per library its size (the zipped
    part dark) and its build time (a cached rebuild pale), and the coverage grid of GPUs x CUDA
    libraries. matplotlib is a build-environment tool here, never a runtime dependency."""
    from matplotlib.figure import Figure

    labels = [r.label for r in rs]
    cuda = [r.label for r in rs if r.cuda]
    fig = Figure(figsize=(13, max(3.5, 0.34 * max(len(rs), len(covered)) + 1.6)), dpi=100, layout="constrained")
    size_ax, time_ax, grid_ax = fig.subplots(1, 3, width_ratios=[1, 1, 1.5])
    y = list(range(len(rs)))
    size_ax.barh(y, [r.size / 1e6 for r in rs], color=_SIZE, label="size")
    size_ax.barh(y, [(r.zipped or 0) / 1e6 for r in rs], color=_ZIPPED, label="zipped in the wheel")
    size_ax.set_yticks(y, labels)
    size_ax.invert_yaxis()
    size_ax.set_xlabel("MB")
    size_ax.set_title("library size")
    size_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    time_ax.barh(y, [r.seconds or 0.0 for r in rs], color=[_CACHED if r.cached else _TIME for r in rs])
    time_ax.set_yticks(y, labels)
    time_ax.invert_yaxis()
    time_ax.set_xlabel("seconds (pale: cached, the build that made it)")
    time_ax.set_title("build time")
    if covered and cuda:
        from matplotlib.colors import ListedColormap

        kinds = list(_CELL_COLOR)
        grid = [[kinds.index(_cell_kind(c)) for c in cells] for _, cells in covered]
        grid_ax.imshow(grid, cmap=ListedColormap([_CELL_COLOR[k] for k in kinds]), vmin=0, vmax=len(kinds) - 1,
                       aspect="auto")
        grid_ax.set_xticks(range(len(cuda)), cuda, rotation=45, ha="right")
        grid_ax.set_yticks(range(len(covered)), [label for label, _ in covered])
        for i, (_, cells) in enumerate(covered):
            for j, c in enumerate(cells):
                text = {"cubin": "cubin", "PTX JIT": "PTX", "-": ""}.get(c, c.removeprefix("cubin "))
                grid_ax.text(j, i, text, ha="center", va="center", fontsize=6)
        grid_ax.set_title("GPU coverage")
        grid_ax.set_xlabel("green: its cubin, pale: an earlier minor's, yellow: PTX JIT, grey: none", fontsize=8)
    else:
        grid_ax.set_axis_off()
    return fig


def chart_png(rs: Sequence[ReportRow], covered: Sequence[tuple[str, list[str]]]) -> bytes:
    """The chart as PNG bytes (the same bytes for the same input: no timestamp or version metadata)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    buf = io.BytesIO()
    chart(rs, covered).savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


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
    (out_dir / "report.png").write_bytes(chart_png(rs, coverage(manifest, _NOTABLE_DEVICES)))
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
    import argparse

    p = argparse.ArgumentParser(description="Write dist/report.md and report.png for a built wheel.")
    p.add_argument("wheel", type=Path)
    p.add_argument("stage", type=Path, nargs="?", help="the folder of the build records (build/stage)")
    p.add_argument("--seconds", type=float, default=0.0, help="how long the build took")
    p.add_argument("--unbuilt", type=Path, help="a file of the lines saying which rows were not built")
    a = p.parse_args(argv)
    records = read_records(a.stage) if a.stage else []
    unbuilt = a.unbuilt.read_text().splitlines() if a.unbuilt else []
    lines, _ = write_report(a.wheel, records, a.wheel.parent, a.seconds,
                            sorted((a.wheel.parent / "slim").glob("kbit-*.whl")), unbuilt)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
