"""8-bit blockwise and NF4 quantize/dequantize: kbit against bitsandbytes' CPU path and a memcpy yardstick.

    python benchmarks/bench_blockwise.py [--n 4194304] [--repeat 15] [--json out.json]

Every figure is the median of --repeat timed runs after two warm-ups, on the same fp32 input.
The ratios are what to compare across machines: kbit/bitsandbytes speed-up, and kbit's time over
the time of copying the same bytes (memcpy of the input).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch


def median_ms(fn, repeat: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 22)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import kbit.functional as F

    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None

    torch.manual_seed(0)
    A = torch.randn(args.n, dtype=torch.float32)
    dst = torch.empty_like(A)
    memcpy = median_ms(lambda: dst.copy_(A), args.repeat)
    rows = []
    for blocksize in (64, 4096):
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        kq = median_ms(functools.partial(F.quantize_blockwise, A, blocksize=blocksize), args.repeat)
        kd = median_ms(functools.partial(F.dequantize_blockwise, codes, state), args.repeat)
        bq = bd = None
        if bnb is not None:
            bcodes, bstate = bnb.quantize_blockwise(A, blocksize=blocksize)
            bq = median_ms(functools.partial(bnb.quantize_blockwise, A, blocksize=blocksize), args.repeat)
            bd = median_ms(functools.partial(bnb.dequantize_blockwise, bcodes, bstate), args.repeat)
        rows.append(("quantize", blocksize, kq, bq))
        rows.append(("dequantize", blocksize, kd, bd))
    for blocksize in (64,):
        packed, state4 = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
        out = torch.empty_like(A)
        kq = median_ms(functools.partial(F.quantize_4bit, A, blocksize=blocksize, quant_type="nf4"), args.repeat)
        kd = median_ms(functools.partial(F.dequantize_4bit, packed, state4, out=out), args.repeat)
        bq = bd = None
        if bnb is not None:
            bpacked, bstate4 = bnb.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
            bq = median_ms(functools.partial(bnb.quantize_4bit, A, blocksize=blocksize, quant_type="nf4"), args.repeat)
            bd = median_ms(functools.partial(bnb.dequantize_4bit, bpacked, bstate4), args.repeat)
        rows.append(("nf4 quant", blocksize, kq, bq))
        rows.append(("nf4 dequant", blocksize, kd, bd))

    print(f"8-bit blockwise and NF4, {args.n} fp32 values on CPU ({torch.get_num_threads()} torch threads); "
          f"median of {args.repeat}; memcpy {memcpy:.2f} ms")
    print(f"{'op':<12}{'block':>6}{'kbit ms':>10}{'bnb ms':>10}{'speed-up':>10}{'x memcpy':>10}")
    for op, bs, k, b in rows:
        speed = f"{b / k:.2f}x" if b else "-"
        print(f"{op:<12}{bs:>6}{k:>10.2f}{(b or float('nan')):>10.2f}{speed:>10}{k / memcpy:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "memcpy_ms": memcpy,
                       "rows": [dict(op=o, blocksize=bs, kbit_ms=k, bnb_ms=b) for o, bs, k, b in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
