"""A 4-bit linear layer on the CPU: kbit.nn.Linear4bit against bitsandbytes' fastest CPU path and the
time it takes to read the packed weight once from memory.

    python benchmarks/bench_cpu_linear.py [--size 4096] [--layers 8] [--repeat 15] [--json out.json]

For 1, 4, 16 and 64 rows and float32 and bfloat16 compute, y = x @ W.T for an NF4 weight of
size x size (blocksize 64, double quant as transformers' default), both layers in eval mode under
torch.no_grad():
  - kbit: kbit.nn.Linear4bit (on the CPU without gradients: kbit_matmul_4bit_tiled on the layer's
    copy of the weight in the CPU's tiled layout, made on its first call);
  - kbit packed: the same layers with cpu_layout = False (kbit_matmul_4bit on the bitsandbytes-layout
    bytes: what a forward that wants gradients runs);
  - bitsandbytes: bitsandbytes.nn.Linear4bit, its default CPU path (which, on a CPU with AVX-512-BF16,
    repacks the weight on first use and runs its own bfloat16 kernel; its functional matmul_4bit is
    the slower generic path, not measured here; its optional kernel from the `kernels` hub needs a
    download and is not measured either);
  - read: the time of one pass over the packed bytes (a sum of them as int64, torch's threads),
    the floor of a kernel that reads the weight once.
--layers distinct layers are cycled through (8 x 8 MB at size 4096, more than the L3 cache), so every
call reads its weight from memory as a model's decode step does. Medians of --repeat interleaved
rounds (each round runs every function once, on the same layer). Also the 8-bit blockwise dequantize
of 2^22 values (blocksize 4096 and 64), kbit against bitsandbytes' CPU dequantize_blockwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from typing import Callable

import torch
from _timing import interleaved_medians


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Cycle:
    """Calls fn(layer) on the next of the layers at each call: the weight comes from memory."""

    def __init__(self, layers: list, fn: Callable) -> None:
        self.layers, self.fn, self.i = layers, fn, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % len(self.layers)
        return self.fn(self.layers[self.i])


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on its bitsandbytes-layout bytes (no tiled copy)."""
    layer.cpu_layout = False
    try:
        return layer(x)
    finally:
        layer.cpu_layout = True


def linear_rows(size: int, layers: int, repeat: int, bnb) -> list[dict]:
    import kbit.nn as knn

    ours, theirs, packed = {}, {}, []
    for compute in (torch.float32, torch.bfloat16):
        ours[compute], theirs[compute] = [], []
    for i in range(layers):
        torch.manual_seed(i)
        lin = torch.nn.Linear(size, size, bias=False)
        for compute in (torch.float32, torch.bfloat16):
            q = knn.Linear4bit.from_linear(lin, compute_dtype=compute, quant_type="nf4", compress_statistics=True)
            ours[compute].append(q.eval())
            if bnb is not None:
                b = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=compute, quant_type="nf4",
                                      compress_statistics=True)
                b.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                theirs[compute].append(b.to("cpu").eval())
        packed.append(ours[torch.float32][-1].weight.reshape(-1).view(torch.int64))
        del lin
    rows = []
    with torch.no_grad():
        for compute in (torch.float32, torch.bfloat16):
            for m in (1, 4, 16, 64):
                x = torch.randn(m, size, generator=torch.Generator().manual_seed(m)).to(compute)
                fns: dict[str, Callable[[], object]] = {
                    "read": Cycle(packed, lambda w: w.sum()),
                    "kbit": Cycle(ours[compute], lambda layer, x=x: layer(x)),
                    "packed": Cycle(ours[compute], lambda layer, x=x: packed_forward(layer, x)),
                }
                if bnb is not None:
                    fns["bnb"] = Cycle(theirs[compute], lambda layer, x=x: layer(x))
                t = interleaved_medians(fns, repeat, warmup=layers)
                row = {"compute": str(compute).replace("torch.", ""), "rows": m, "kbit_ms": t["kbit"],
                       "kbit_packed_ms": t["packed"], "read_ms": t["read"], "kbit_over_read": t["kbit"] / t["read"]}
                if bnb is not None:
                    row.update(bnb_ms=t["bnb"], speedup_vs_bnb=t["bnb"] / t["kbit"])
                rows.append(row)
    return rows


def dequant8_rows(n: int, repeat: int, bnbf) -> list[dict]:
    import kbit.functional as F

    A = torch.randn(n, generator=torch.Generator().manual_seed(0))
    out = []
    for blocksize in (4096, 64):
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        fns: dict[str, Callable[[], object]] = {"kbit": lambda c=codes, s=state: F.dequantize_blockwise(c, s)}
        if bnbf is not None:
            bcodes, bstate = bnbf.quantize_blockwise(A, blocksize=blocksize)
            fns["bnb"] = lambda c=bcodes, s=bstate: bnbf.dequantize_blockwise(c, s)
        t = interleaved_medians(fns, repeat)
        row = {"op": "dequantize_blockwise 8-bit", "n": n, "blocksize": blocksize, "kbit_ms": t["kbit"]}
        if bnbf is not None:
            row.update(bnb_ms=t["bnb"], speedup_vs_bnb=t["bnb"] / t["kbit"])
        out.append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = bnbf = None
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads; NF4 {args.size} x {args.size}, "
          f"blocksize 64, {args.layers} layers cycled")
    lin = linear_rows(args.size, args.layers, args.repeat, bnb)
    print(f"{'compute':9} {'rows':>4} {'kbit ms':>9} {'packed ms':>10} {'bnb ms':>9} {'kbit vs bnb':>12} "
          f"{'read ms':>9} {'kbit/read':>10}")
    for r in lin:
        bnb_ms = f"{r['bnb_ms']:9.3f}" if "bnb_ms" in r else f"{'-':>9}"
        ratio = f"{r['speedup_vs_bnb']:11.2f}x" if "speedup_vs_bnb" in r else f"{'-':>12}"
        print(f"{r['compute']:9} {r['rows']:4d} {r['kbit_ms']:9.3f} {r['kbit_packed_ms']:10.3f} {bnb_ms} {ratio} "
              f"{r['read_ms']:9.3f} {r['kbit_over_read']:9.2f}x")
    deq = dequant8_rows(1 << 22, args.repeat, bnbf)
    for r in deq:
        extra = f", bnb {r['bnb_ms']:.3f} ms ({r['speedup_vs_bnb']:.2f}x)" if "bnb_ms" in r else ""
        print(f"8-bit dequantize 2^22 values, blocksize {r['blocksize']}: kbit {r['kbit_ms']:.3f} ms{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "linear": lin, "dequantize8": deq}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
