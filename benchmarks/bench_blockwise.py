"""8-bit blockwise and NF4 quantize/dequantize: kbit against bitsandbytes' CPU path and a memcpy yardstick.

    python benchmarks/bench_blockwise.py [--n 4194304] [--repeat 15] [--json out.json]

Every figure is the median of --repeat timed runs after two warm-ups, on the same fp32 input. The
runs are interleaved (one run of every timed function per round: memcpy, then each op for kbit and
for bitsandbytes), so a load change on a shared machine hits all of them alike instead of whichever
was being timed at the moment. Both libraries are called the same way, each call allocating its
outputs (bitsandbytes' CPU path takes no preallocated `out`).
The ratios are what to compare across machines: kbit/bitsandbytes speed-up, and kbit's time over
the time of copying the same bytes (memcpy of the input).
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Callable

import torch
from _timing import interleaved_medians


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
    fns: dict[str, Callable[[], object]] = {"memcpy": lambda: dst.copy_(A)}
    ops = []  # (op, blocksize, kbit key, bnb key or None)
    for blocksize in (64, 4096):
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        fns[f"kq{blocksize}"] = functools.partial(F.quantize_blockwise, A, blocksize=blocksize)
        fns[f"kd{blocksize}"] = functools.partial(F.dequantize_blockwise, codes, state)
        if bnb is not None:
            bcodes, bstate = bnb.quantize_blockwise(A, blocksize=blocksize)
            fns[f"bq{blocksize}"] = functools.partial(bnb.quantize_blockwise, A, blocksize=blocksize)
            fns[f"bd{blocksize}"] = functools.partial(bnb.dequantize_blockwise, bcodes, bstate)
        ops.append(("quantize", blocksize, f"kq{blocksize}", f"bq{blocksize}" if bnb else None))
        ops.append(("dequantize", blocksize, f"kd{blocksize}", f"bd{blocksize}" if bnb else None))
    for blocksize in (64,):
        packed, state4 = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
        fns[f"kq4_{blocksize}"] = functools.partial(F.quantize_4bit, A, blocksize=blocksize, quant_type="nf4")
        fns[f"kd4_{blocksize}"] = functools.partial(F.dequantize_4bit, packed, state4)
        if bnb is not None:
            bpacked, bstate4 = bnb.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
            fns[f"bq4_{blocksize}"] = functools.partial(bnb.quantize_4bit, A, blocksize=blocksize, quant_type="nf4")
            fns[f"bd4_{blocksize}"] = functools.partial(bnb.dequantize_4bit, bpacked, bstate4)
        ops.append(("nf4 quant", blocksize, f"kq4_{blocksize}", f"bq4_{blocksize}" if bnb else None))
        ops.append(("nf4 dequant", blocksize, f"kd4_{blocksize}", f"bd4_{blocksize}" if bnb else None))

    med = interleaved_medians(fns, args.repeat)
    memcpy = med["memcpy"]
    rows = [(op, bs, med[k], med[b] if b else None) for op, bs, k, b in ops]
    print(f"8-bit blockwise and NF4, {args.n} fp32 values on CPU ({torch.get_num_threads()} torch threads); "
          f"median of {args.repeat}, interleaved; memcpy {memcpy:.2f} ms")
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
