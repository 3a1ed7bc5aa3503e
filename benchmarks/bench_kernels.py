"""4-bit GEMV and one 8-bit Adam step on CPU: kbit against bitsandbytes' CPU path and plain torch.

    python benchmarks/bench_kernels.py [--size 4096] [--params 4194304] [--repeat 15] [--json out.json]

GEMV: one row x (size) times an NF4 weight (size x size, blocksize 64), y = x @ W.T, for fp32, fp16
and bf16 x: kbit's gemv_4bit, bitsandbytes' matmul_4bit (its generic functional path; its faster default
path, Linear4bit's repacked weight, is what bench_cpu_linear.py measures), torch's dequantize +
matmul, torch's matmul of the already dequantized weight (the fp32 GEMV a 4-bit kernel replaces), and
a memcpy of the packed weight (the bytes a GEMV must read: the bandwidth floor).
Adam: one optimizer step of --params fp32 parameters: kbit.optim.Adam8bit, bitsandbytes' Adam8bit
(CPU) and torch.optim.Adam (fp32 moments, foreach). Medians of --repeat interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
from _timing import interleaved_medians


def gemv_row(dtype: torch.dtype, size: int, repeat: int, bnb) -> dict:
    import kbit.functional as F

    torch.manual_seed(0)
    W = torch.randn(size, size).to(dtype)
    x = torch.randn(1, size).to(dtype)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    Wd = F.dequantize_4bit(packed, state)
    dst = torch.empty_like(packed)
    fns: dict[str, Callable[[], object]] = {
        "kbit": lambda: F.gemv_4bit(x, packed, state),
        "dequant+matmul": lambda: x @ F.dequantize_4bit(packed, state).t(),
        "matmul": lambda: x @ Wd.t(),
        "memcpy": lambda: dst.copy_(packed),
    }
    if bnb is not None:
        bpacked, bstate = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
        fns["bnb"] = lambda: bnb.matmul_4bit(x, bpacked.t(), quant_state=bstate)
    return {"dtype": str(dtype).replace("torch.", ""), **interleaved_medians(fns, repeat)}


def gemv_rows(size: int, repeat: int) -> list[dict]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    return [gemv_row(dtype, size, repeat, bnb) for dtype in (torch.float32, torch.float16, torch.bfloat16)]


def adam_rows(n: int, repeat: int) -> list[dict]:
    import kbit.optim

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    torch.manual_seed(0)

    def stepper(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> Callable[[], object]:
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n) * 1e-2
        return make([p]).step

    fns: dict[str, Callable[[], object]] = {
        "kbit": stepper(lambda ps: kbit.optim.Adam8bit(ps, lr=1e-3)),
        "torch": stepper(lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    }
    if bnb is not None:
        fns["bnb"] = stepper(lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3))
    return [{"params": n, **interleaved_medians(fns, repeat)}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--params", type=int, default=1 << 22)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    gemv = gemv_rows(args.size, args.repeat)
    print(f"4-bit GEMV, NF4 weight {args.size}x{args.size} (blocksize 64), one row; median of {args.repeat}, "
          f"interleaved; {torch.get_num_threads()} torch threads")
    print(f"{'x dtype':<10}{'kbit ms':>9}{'bnb ms':>9}{'deq+mm ms':>11}{'mm ms':>8}{'vs bnb':>8}{'vs deq+mm':>11}"
          f"{'x memcpy':>10}")
    for r in gemv:
        bnb = r.get("bnb", float("nan"))
        print(f"{r['dtype']:<10}{r['kbit']:>9.2f}{bnb:>9.2f}{r['dequant+matmul']:>11.2f}{r['matmul']:>8.2f}"
              f"{bnb / r['kbit']:>7.1f}x{r['dequant+matmul'] / r['kbit']:>10.1f}x{r['kbit'] / r['memcpy']:>10.1f}")
    adam = adam_rows(args.params, args.repeat)
    print(f"\n8-bit Adam, one step of {args.params} fp32 parameters; median of {args.repeat}, interleaved")
    print(f"{'':<10}{'kbit ms':>9}{'bnb ms':>9}{'torch ms':>10}{'vs bnb':>8}{'vs torch':>10}")
    for r in adam:
        bnb = r.get("bnb", float("nan"))
        print(f"{'Adam8bit':<10}{r['kbit']:>9.2f}{bnb:>9.2f}{r['torch']:>10.2f}{bnb / r['kbit']:>7.1f}x"
              f"{r['torch'] / r['kbit']:>9.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemv": gemv, "adam": adam}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
