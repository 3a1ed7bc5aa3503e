"""kbit's CUDA kernels on a GPU: each against bitsandbytes' CUDA kernel on the same input, in GB/s and as
a fraction of the device's copy bandwidth (a device-to-device copy, measured here: the practical peak).

kbit is timed at its C ABI (the loaded libkbit_cudaXY.so, torch's current stream), bitsandbytes through
its functional API / optimizer on the same tensors; CUDA events around each call, medians of
interleaved rounds (benchmarks/_timing.py's rule).

    python benchmarks/bench_gpu.py [--repeat 15] [--json OUT]
    python benchmarks/bench_gpu.py --emulated LIB   the same steps on the emulated CUDA library
        (tests/cuda_emu) with CPU tensors and tiny sizes: a check that the script runs, not a timing
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from _timing import interleaved_medians, wall_ms

KBIT_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass
class Result:
    op: str
    shape: str
    bytes: int
    kbit_ms: float
    bnb_ms: Optional[float]
    bnb_note: str = ""

    @property
    def kbit_gbps(self) -> float:
        return self.bytes / self.kbit_ms / 1e6

    def row(self, copy_gbps: Optional[float]) -> str:
        frac = f"{self.kbit_gbps / copy_gbps:.2f}" if copy_gbps else "-"
        bnb = f"{self.bnb_ms:.4f}" if self.bnb_ms is not None else f"- ({self.bnb_note})" if self.bnb_note else "-"
        ratio = f"{self.bnb_ms / self.kbit_ms:.2f}x" if self.bnb_ms is not None else "-"
        return (f"| {self.op} | {self.shape} | {self.kbit_ms:.4f} | {bnb} | {ratio} | {self.kbit_gbps:.1f} | "
                f"{frac} |")


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock on the host."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            return wall_ms(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def medians(timer: Timer, fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    return interleaved_medians(fns, repeat, timer=timer)


def copy_bandwidth(device: str, timer: Timer, nbytes: int, repeat: int) -> float:
    """GB/s of a copy of nbytes (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = medians(timer, {"copy": lambda: dst.copy_(src)}, repeat)["copy"]
    return 2 * nbytes / ms / 1e6


def bench_dtype(lib: Any, bnb: Any, bnb_f: Any, peer: Callable, bench: Callable, dtype: torch.dtype, device: str,
                stream: Optional[int], sizes: dict[str, int], gen: torch.Generator) -> None:
    """The quantize/dequantize and GEMV benchmarks of one input dtype."""
    from kbit import functional as F

    n = sizes["n"]
    code = F.dynamic_map(signed=True).to(device)
    esz = torch.finfo(dtype).bits // 8
    A = torch.randn(n, generator=gen).to(dtype).to(device)
    bs = 256
    codes = torch.empty(n, dtype=torch.uint8, device=device)
    absmax = torch.empty(n // bs, dtype=torch.float32, device=device)
    out = torch.empty_like(A)
    D = KBIT_DTYPE[dtype]
    q8 = lambda: lib.quantize_blockwise_8bit(D, A.data_ptr(), code.data_ptr(), codes.data_ptr(),  # noqa: E731
                                             absmax.data_ptr(), n, bs, stream)
    q8()
    bench(f"8-bit quantize {dtype}", f"{n} bs {bs}", n * esz + n + 4 * n // bs, q8,
          lambda: bnb_f.quantize_blockwise(A, blocksize=bs))
    bq = peer(lambda: bnb_f.quantize_blockwise(A, blocksize=bs))[0]
    bcodes, bstate = bq() if bq else (None, None)
    bench(f"8-bit dequantize {dtype}", f"{n} bs {bs}", n + 4 * n // bs + n * esz,
          lambda: lib.dequantize_blockwise_8bit(D, codes.data_ptr(), code.data_ptr(), absmax.data_ptr(),
                                                out.data_ptr(), n, bs, stream),
          lambda: bnb_f.dequantize_blockwise(bcodes, bstate))
    bs4 = 64
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax4 = torch.empty(n // bs4, dtype=torch.float32, device=device)
    q4 = lambda: lib.quantize_4bit(D, 1, A.data_ptr(), packed.data_ptr(), absmax4.data_ptr(), n, bs4,  # noqa: E731
                                   stream)
    q4()
    bench(f"NF4 quantize {dtype}", f"{n} bs {bs4}", n * esz + n // 2 + 4 * n // bs4, q4,
          lambda: bnb_f.quantize_4bit(A, blocksize=bs4, quant_type="nf4"))
    b4 = peer(lambda: bnb_f.quantize_4bit(A, blocksize=bs4, quant_type="nf4"))[0]
    bpacked, bstate4 = b4() if b4 else (None, None)
    bench(f"NF4 dequantize {dtype}", f"{n} bs {bs4}", n // 2 + 4 * n // bs4 + n * esz,
          lambda: lib.dequantize_4bit(D, 1, packed.data_ptr(), absmax4.data_ptr(), out.data_ptr(), n, bs4,
                                      stream),
          lambda: bnb_f.dequantize_4bit(bpacked, bstate4))
    # GEMV: one row times an n_out x k_in NF4 weight
    n_out, k_in = sizes["gemv_n"], sizes["gemv_k"]
    W = torch.randn(n_out, k_in, generator=gen).to(dtype).to(device)
    wpacked = torch.empty((n_out * k_in + 1) // 2, dtype=torch.uint8, device=device)
    wabs = torch.empty(n_out * k_in // bs4, dtype=torch.float32, device=device)
    lib.quantize_4bit(D, 1, W.data_ptr(), wpacked.data_ptr(), wabs.data_ptr(), n_out * k_in, bs4, stream)
    x = torch.randn(1, k_in, generator=gen).to(dtype).to(device)
    y = torch.empty(n_out, dtype=dtype, device=device)
    bw = peer(lambda: bnb_f.quantize_4bit(W, blocksize=bs4, quant_type="nf4"))[0]
    bwp, bws = bw() if bw else (None, None)
    bench(f"NF4 GEMV {dtype}", f"1x{k_in} . {n_out}x{k_in}",
          n_out * k_in // 2 + 4 * n_out * k_in // bs4 + (k_in + n_out) * esz,
          lambda: lib.gemv_4bit(D, 1, x.data_ptr(), wpacked.data_ptr(), wabs.data_ptr(), None, y.data_ptr(),
                                n_out, k_in, bs4, stream),
          lambda: bnb.matmul_4bit(x, bwp.t(), quant_state=bws))


def run(lib: Any, device: str, sizes: dict[str, int], repeat: int) -> tuple[list[Result], Optional[float], str]:
    """Every benchmark; (results, copy GB/s, what bitsandbytes was)."""
    from kbit import functional as F

    timer = Timer(device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f

        bnb_what = f"bitsandbytes {bnb.__version__}"
    except Exception as e:  # any import failure: no peer, said so in the report
        bnb, bnb_f, bnb_what = None, None, f"bitsandbytes not importable ({type(e).__name__}: {e})"

    def peer(fn: Callable[[], Any]) -> tuple[Optional[Callable[[], Any]], str]:
        if bnb_f is None:
            return None, "not installed"
        try:
            fn()
            return fn, ""
        except Exception as e:  # the peer's failure is reported, not fatal
            return None, f"{type(e).__name__}: {str(e)[:80]}"

    results = []

    def bench(op: str, shape: str, nbytes: int, ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
        fn, note = peer(theirs)
        fns = {"kbit": ours, **({"bnb": fn} if fn is not None else {})}
        t = medians(timer, fns, repeat)
        results.append(Result(op, shape, nbytes, t["kbit"], t.get("bnb"), note))

    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        bench_dtype(lib, bnb, bnb_f, peer, bench, dtype, device, stream, sizes, gen)
    # One 8-bit Adam step of n float32 parameters
    na = sizes["adam"]
    p = torch.randn(na, generator=gen).to(device)
    g = (torch.randn(na, generator=gen) * 0.01).to(device)
    s1 = torch.zeros(na, dtype=torch.uint8, device=device)
    s2 = torch.zeros_like(s1)
    a1 = torch.zeros((na + 255) // 256, device=device)
    a2 = torch.zeros_like(a1)
    q1, q2 = F.dynamic_map(signed=True).to(device), F.dynamic_map(signed=False).to(device)
    bp = torch.nn.Parameter(p.clone())
    bp.grad = g.clone()
    bopt = None
    if bnb is not None:
        try:
            bopt = bnb.optim.Adam8bit([bp], lr=1e-3, min_8bit_size=0)
        except Exception:  # reported by peer() below
            pass
    bench("Adam8bit step fp32", f"{na}", 16 * na + 8 * ((na + 255) // 256),
          lambda: lib.adam_8bit_blockwise(0, p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr(), a1.data_ptr(),
                                          a2.data_ptr(), q1.data_ptr(), q2.data_ptr(), 0.9, 0.999, 1e-8, 0.0, 1e-3,
                                          1, 1.0, False, na, stream),
          lambda: bopt.step())
    copy = copy_bandwidth(device, timer, sizes["copy"], repeat)
    return results, copy, bnb_what


def report(results: list[Result], copy_gbps: Optional[float], header: str) -> list[str]:
    lines = [header, "",
             "| op | shape | kbit ms | bitsandbytes ms | bnb / kbit | kbit GB/s | of copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    lines += [r.row(copy_gbps) for r in results]
    if copy_gbps:
        lines += ["", f"Copy bandwidth (device-to-device, read + write): {copy_gbps:.0f} GB/s."]
    return lines


GPU_SIZES = {"n": 1 << 26, "gemv_n": 16384, "gemv_k": 16384, "adam": 1 << 26, "copy": 1 << 30}
EMULATED_SIZES = {"n": 1 << 12, "gemv_n": 8, "gemv_k": 256, "adam": 1 << 10, "copy": 1 << 20}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--emulated", type=Path, metavar="LIB", help="libkbit_cuda_emu.so: CPU tensors, tiny sizes")
    args = p.parse_args(argv)
    from kbit import _native

    if args.emulated:
        lib, device, sizes, repeat = _native.open_library(args.emulated, None), "cpu", EMULATED_SIZES, min(args.repeat, 3)
        what = "the emulated CUDA library on the host (timings mean nothing)"
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device (use --emulated LIB to check the script)", file=sys.stderr)
            return 2
        load = _native.cuda_library()
        if load.library is None:
            print(f"bench_gpu: no CUDA library: {load.reason}", file=sys.stderr)
            return 2
        lib, device, sizes, repeat = load.library, "cuda", GPU_SIZES, args.repeat
        what = f"{Path(lib.path).name} on {torch.cuda.get_device_name()}"
    results, copy, bnb_what = run(lib, device, sizes, repeat)
    lines = report(results, copy, f"kbit ({what}) against {bnb_what}; medians of {repeat} interleaved rounds.")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"what": what, "peer": bnb_what, "copy_gbps": copy,
                                         "results": [asdict(r) for r in results], "markdown": lines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
