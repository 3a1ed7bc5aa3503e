"""One command for a machine with an NVIDIA GPU and kbit's fat wheel: every bundled CUDA library
validated on the device, and one markdown report.

    python tests/gpu_check.py [--wheel dist/kbit-*.whl] [--wheelhouse DIR] [--out DIR] [--budget SECONDS]
    nox -s gpu [-- ARGS]            the same through nox (no venv: the interpreter's own CUDA torch)
    python tests/gpu_check.py --emulated     every step against libkbit_cuda_emu.so, on the host: the
                                             check tests/test_gpu_check.py runs, so this does not rot
    python tests/gpu_check.py --prepare-wheelhouse dist/gpu-wheelhouse    (where an index answers) the
                                             peer's wheel, slimmed, for a GPU machine without network

The wheel and any wheels in --wheelhouse (bitsandbytes, numpy where the machine lacks them) are
unpacked into OUT/site and put first on PYTHONPATH; nothing is installed. Steps, each timed:

  environment        python -m kbit --json: torch, driver, GPUs, bundled libraries, the policy's pick
  cuda tests X.Y     pytest -m cuda over the CUDA tests, with KBIT_CUDA_VERSION=X.Y, per bundled library
  kernels X.Y        the harness's kernel calls (tests/cuda_emu/specs.py) on the device, judged against
                     libkbit_cpu.so by the harness's rules, per library
  kernels X.Y, PTX   again with CUDA_FORCE_PTX_JIT=1, for the libraries whose PTX the device can JIT
  memcheck/racecheck compute-sanitizer over a subset of the kernel calls, one library
  benchmarks         benchmarks/bench_gpu.py (kbit against bitsandbytes' CUDA kernels, GB/s)

Steps past the budget are skipped and say so. With --emulated the library is the emulated one and
the device is the host: pytest finds no CUDA device (its CUDA tests skip), the PTX step has nothing to
JIT, the sanitizer step runs the sanitized emulation under AddressSanitizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CUDA_TEST_FILES = ["test_functional.py", "test_functional_4bit.py", "test_kernels_adam.py", "test_kernels_gemv.py"]


@dataclass
class Step:
    name: str
    ok: Optional[bool]  # None: skipped
    seconds: float = 0.0
    summary: str = ""
    detail: str = ""


@dataclass
class Context:
    out: Path
    env: dict[str, str]
    emulated: Optional[Path]  # the emulated library, or None on a GPU
    sanitized: Optional[Path]
    deadline: float
    steps: list[Step] = field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


# --- the worker: kernel calls in this process ----------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """Runs the harness's kernel calls on the chosen CUDA library (or the emulated one) and prints a
    JSON summary: the library, how many calls ran, which failed and why."""
    sys.path.insert(0, str(TESTS))
    from cuda_emu.calls import Emulation, run_call, run_call_on_device
    from cuda_emu.specs import SPECS, judge
    from kbit import _native

    cpu = _native.cpu_library()
    if args.emulated:
        lib = _native.open_library(Path(args.emulated), None)
        Emulation(lib).configure(Emulation.RANDOM, 1, 3)
        run = run_call
    else:
        load = _native.cuda_library()
        if load.library is None:
            print(json.dumps({"library": None, "reason": load.reason}))
            return 2
        lib, run = load.library, run_call_on_device
    specs = SPECS[:: args.every] if args.every > 1 else SPECS
    failed = []
    for spec in specs:
        call = spec.make(cpu)
        try:
            problem = judge(spec, call, run_call(cpu, call), run(lib, call))
        except Exception as e:  # a status from the library is a failure of this call, not of the run
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            failed.append(f"{spec.id}: {problem}")
    print(json.dumps({"library": Path(lib.path).name, "ran": len(specs), "failed": failed}))
    return 1 if failed else 0


# --- the steps ------------------------------------------------------------------------------------------


def _run(ctx: Context, cmd: list[str], extra_env: Optional[dict[str, str]] = None,
         timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    env = {**ctx.env, **(extra_env or {})}
    limit = max(10.0, min(timeout or ctx.time_left(), ctx.time_left()))
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes)
                                           else (e.stdout or ""), f"timed out after {limit:.0f} s")


def step(ctx: Context, name: str, fn) -> Step:
    if ctx.time_left() < 15:
        s = Step(name, None, summary="skipped: the time budget is spent")
    else:
        t0 = time.monotonic()
        try:
            s = fn()
        except Exception as e:  # a broken step is reported, the others still run
            s = Step(name, False, summary=f"{type(e).__name__}: {e}")
        s.name, s.seconds = name, time.monotonic() - t0
    print(f"[gpu_check] {s.name}: {'skipped' if s.ok is None else 'ok' if s.ok else 'FAILED'} "
          f"({s.seconds:.1f} s) {s.summary}", flush=True)
    ctx.steps.append(s)
    return s


def environment(ctx: Context) -> tuple[Step, dict]:
    r = _run(ctx, [sys.executable, "-m", "kbit", "--json"])
    try:
        info = json.loads(r.stdout)
    except ValueError:
        return Step("", False, summary=f"python -m kbit --json failed ({r.returncode})", detail=r.stderr[-3000:]), {}
    smi = shutil.which("nvidia-smi")
    gpus = _run(ctx, [smi, "-L"]).stdout.strip() if smi else "no nvidia-smi"
    decision = info.get("decision") or {}
    summary = f"{decision.get('file')}: {decision.get('reason', '')}"[:300]
    return Step("", r.returncode == 0, summary=summary, detail=f"nvidia-smi -L:\n{gpus}\n\n{r.stdout[:6000]}"), info


def bundled_libraries(info: dict) -> list[dict]:
    """The manifest's CUDA libraries (file, cuda, archs, ptx), as python -m kbit --json lists them."""
    return [lib for lib in (info.get("manifest") or {}).get("libraries", []) if lib.get("cuda")]


def _junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    return counts


def cuda_tests(ctx: Context, version: str) -> Step:
    xml = ctx.out / f"junit-cuda{version.replace('.', '')}.xml"
    files = [str(TESTS / f) for f in CUDA_TEST_FILES]
    r = _run(ctx, [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
                   *files], {"KBIT_CUDA_VERSION": version})
    if not xml.exists():
        return Step("", False, summary=f"pytest exit {r.returncode}, no report", detail=(r.stdout + r.stderr)[-4000:])
    c = _junit_counts(xml)
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    summary = f"{passed} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
    ok = r.returncode in (0, 5) and c["failures"] + c["errors"] == 0
    if ctx.emulated is None and passed == 0:
        ok, summary = False, summary + " (nothing ran on the device)"
    return Step("", ok, summary=summary, detail=(r.stdout + r.stderr)[-4000:] if not ok else "")


def kernels(ctx: Context, version: Optional[str], ptx_jit: bool = False, every: int = 1,
            prefix: Optional[list[str]] = None, lib: Optional[Path] = None, extra_env: Optional[dict] = None) -> Step:
    env = dict(extra_env or {})
    if version:
        env["KBIT_CUDA_VERSION"] = version
    if ptx_jit:
        env["CUDA_FORCE_PTX_JIT"] = "1"
    cmd = [*(prefix or []), sys.executable, str(Path(__file__).resolve()), "--worker", "--every", str(every)]
    lib = lib or ctx.emulated
    if lib is not None:
        cmd += ["--emulated", str(lib)]
    r = _run(ctx, cmd, env)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    try:
        res = json.loads(last)
    except ValueError:
        return Step("", False, summary=f"exit {r.returncode}", detail=(r.stdout + r.stderr)[-6000:])
    failed = res.get("failed", [])
    summary = f"{res.get('library')}: {res.get('ran', 0) - len(failed)} of {res.get('ran', 0)} calls as the CPU library"
    ok = r.returncode == 0 and not failed and res.get("ran", 0) > 0
    detail = "\n".join(failed[:40]) + ("\n" + r.stderr[-4000:] if not ok else "")
    return Step("", ok, summary=summary if res.get("library") else f"no library: {res.get('reason')}", detail=detail)


def sanitizers(ctx: Context, version: Optional[str]) -> list[tuple[str, Step]]:
    """compute-sanitizer memcheck and racecheck over every 8th kernel call (one library)."""
    if ctx.emulated is not None:
        sys.path.insert(0, str(TESTS))
        from cuda_emu.build import asan_runtime

        env = {"LD_PRELOAD": asan_runtime(), "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
               "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "PYTHONMALLOC": "malloc"}
        return [("sanitizers (emulated: AddressSanitizer + UBSan)",
                 lambda: kernels(ctx, None, every=8, lib=ctx.sanitized, extra_env=env))]
    tool = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer") if p.is_file()), None)
    if tool is None:
        return [("memcheck, racecheck", lambda: Step("", None, summary="skipped: no compute-sanitizer on this machine"))]
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # every buffer its own allocation: reads past it are seen
    return [(f"{t} (cuda {version})", lambda t=t: kernels(ctx, version, every=8, extra_env=env, prefix=[
        tool, "--tool", t, "--error-exitcode", "1", "--print-limit", "20"])) for t in ("memcheck", "racecheck")]


def benchmarks(ctx: Context) -> Step:
    js = ctx.out / "bench_gpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--json", str(js)]
    if ctx.emulated is not None:
        cmd += ["--emulated", str(ctx.emulated)]
    r = _run(ctx, cmd)
    if r.returncode != 0 or not js.exists():
        return Step("", False, summary=f"exit {r.returncode}", detail=(r.stdout + r.stderr)[-4000:])
    data = json.loads(js.read_text())
    return Step("", True, summary=f"{len(data['results'])} kernels timed; {data['peer']}", detail="\n".join(data["markdown"]))


def ptx_runs_on(lib: dict, device_sm: Optional[int]) -> bool:
    """A library's PTX JITs on the device when its PTX arch is at or below the device's (same or newer)."""
    if device_sm is None:
        return False
    return any(int(p) <= device_sm for p in lib.get("ptx", []) if str(p).isdigit())


def device_sm(info: dict) -> Optional[int]:
    """The lowest compute capability of the driver's GPUs (sm_90 -> 90); None without one."""
    caps = [10 * int(d["capability"][0]) + int(d["capability"][1]) for d in (info.get("driver") or {}).get("devices", [])
            if isinstance(d.get("capability"), (list, tuple)) and len(d["capability"]) == 2]
    return min(caps) if caps else None


# --- setup and report ----------------------------------------------------------------------------------------


def unpack(wheels: list[Path], site: Path) -> None:
    """Wheels are zip archives of importable trees: unpacked, they import without pip."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
        for so in site.rglob("*.so"):
            so.chmod(0o755)


PEER = "bitsandbytes==0.50.2"


def prepare_wheelhouse(dest: Path, cuda_tag: str) -> Path:
    """On a machine with an index: bitsandbytes' wheel, slimmed to the CPU library and the one CUDA
    library the GPU machine's torch loads (cuda_tag, e.g. 130 for torch cu130), for a GPU machine
    without network (its carry limit is 64 MiB; the full wheel is 43 MB)."""
    dest.mkdir(parents=True, exist_ok=True)
    raw = dest / "raw"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--platform", "manylinux_2_24_x86_64", "-d", str(raw), PEER], check=True)
    (src,) = raw.glob("bitsandbytes-*.whl")
    keep = {f"libbitsandbytes_cuda{cuda_tag}.so", "libbitsandbytes_cpu.so"}
    out = dest / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        dropped = {i.filename for i in zin.infolist()
                   if i.filename.endswith(".so") and Path(i.filename).name not in keep}
        for item in zin.infolist():
            if item.filename in dropped:
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",", 1)[0].decode() not in dropped)
            zout.writestr(item, data)
    shutil.rmtree(raw)
    return out


def write_report(ctx: Context, header: list[str]) -> Path:
    lines = ["# kbit on a GPU: tests/gpu_check.py", "", *header, "",
             "| step | result | time | summary |", "|---|---|---|---|"]
    for s in ctx.steps:
        res = "skipped" if s.ok is None else "ok" if s.ok else "**FAILED**"
        lines.append(f"| {s.name} | {res} | {s.seconds:.1f} s | {s.summary.replace('|', '/')} |")
    for s in ctx.steps:
        if s.detail:
            lines += ["", f"## {s.name}", "", "```" if "| op |" not in s.detail else "", s.detail,
                      "```" if "| op |" not in s.detail else ""]
    path = ctx.out / "gpu-report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, help="kbit's fat wheel (default: the one in dist/)")
    p.add_argument("--wheelhouse", type=Path, help="more wheels to unpack beside it (bitsandbytes, numpy)")
    p.add_argument("--out", type=Path, default=REPO / "dist" / "gpu", help="the report and the unpacked site")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all steps (later ones are skipped)")
    p.add_argument("--emulated", nargs="?", const="build", metavar="LIB",
                   help="run every step against the emulated CUDA library (built when no LIB is given)")
    p.add_argument("--prepare-wheelhouse", type=Path, metavar="DIR",
                   help=f"download {PEER} into DIR, slimmed to one CUDA library (--peer-cuda), and stop")
    p.add_argument("--peer-cuda", default="130", help="the CUDA tag of the GPU machine's torch (default 130)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.prepare_wheelhouse:
        print(prepare_wheelhouse(args.prepare_wheelhouse, args.peer_cuda))
        return 0

    t_start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wheel = args.wheel or next(iter(sorted((REPO / "dist").glob("kbit-*-py3-none-*.whl"))), None)
    if wheel is None:
        print("gpu_check: no kbit wheel (run nox -s build, or pass --wheel)", file=sys.stderr)
        return 2
    extra = sorted(args.wheelhouse.glob("*.whl")) if args.wheelhouse else []
    unpack([wheel, *extra], out / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(out / "site"), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    emulated = sanitized = None
    if args.emulated:
        sys.path.insert(0, str(TESTS))
        from cuda_emu.build import build

        emulated = Path(args.emulated) if args.emulated != "build" else build(sanitize=False)
        sanitized = build(sanitize=True)
    ctx = Context(out, env, emulated, sanitized, t_start + args.budget)

    env_step = None
    info: dict = {}

    def env_fn():
        nonlocal info, env_step
        env_step, info = environment(ctx)
        return env_step

    step(ctx, "environment", env_fn)
    libs = bundled_libraries(info)
    sm = device_sm(info)
    if not libs:
        step(ctx, "libraries", lambda: Step("", False, summary="the wheel's manifest lists no CUDA library"))
    # Emulated, one library stands for all: pytest finds no device whichever is forced, and the
    # kernel calls run on the one emulated library.
    for lib in libs[:1] if emulated else libs:
        v = str(lib["cuda"])
        step(ctx, f"cuda tests {v}", lambda v=v: cuda_tests(ctx, v))
    if emulated:
        step(ctx, "kernels (emulated)", lambda: kernels(ctx, None))
    for lib in [] if emulated else libs:
        v = str(lib["cuda"])
        step(ctx, f"kernels {v}", lambda v=v: kernels(ctx, v))
    for lib in libs:
        v = str(lib["cuda"])
        if ptx_runs_on(lib, sm):
            step(ctx, f"kernels {v}, PTX JIT", lambda v=v: kernels(ctx, v, ptx_jit=True))
        else:
            step(ctx, f"kernels {v}, PTX JIT", lambda lib=lib: Step(
                "", None, summary=f"skipped: PTX {','.join(lib.get('ptx', [])) or 'none'} cannot JIT on "
                                  f"{'this host' if sm is None else f'sm_{sm}'}"))
    default_version = str(libs[-1]["cuda"]) if libs else None
    for name, fn in sanitizers(ctx, default_version):
        step(ctx, name, fn)
    step(ctx, "benchmarks", lambda: benchmarks(ctx))

    header = [f"- wheel: `{wheel.name}`" + (f", with {', '.join(w.name for w in extra)}" if extra else ""),
              f"- {'emulated CUDA library ' + emulated.name + ' on the host' if emulated else 'device run'}; "
              f"python {sys.version.split()[0]}; budget {args.budget:.0f} s, used {time.monotonic() - t_start:.0f} s"]
    report = write_report(ctx, header)
    print(f"[gpu_check] report: {report}")
    return 0 if all(s.ok is not False for s in ctx.steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
