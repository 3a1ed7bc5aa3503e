"""The fuzz harness of kbit's Python API: the functional API, QuantState4bit's dict format, the torch
operators called directly, kbit.nn.Linear4bit and the 8-bit optimizers, driven by the bytes of an input.

An input picks a target (its first byte) and every argument from the bytes after it: dtypes (float
and not), shapes, layouts (non-contiguous, expanded to billions of values, meta, sparse), values (NaN,
inf, subnormals, huge), blocksizes and quant types (valid and not, ints and other objects), tampered
states and state dicts, optimizer settings changed between steps. What is checked:

  - every exception is one kbit documents: TypeError, ValueError or a KbitError (Linear4bit's
    load_state_dict: torch's RuntimeError collecting them); anything else is a finding;
  - results are right where they can be judged cheaply: shapes and dtypes as documented, dequantized
    values equal to the format's definition (tests/reference.py), quantize then dequantize of finite
    values within the codebook's bound, a finite optimizer step staying finite.

    python tests/fuzz/api_harness.py CORPUS_DIR [libFuzzer flags]   coverage-guided, with atheris
    python tests/fuzz/api_harness.py --replay FILE_OR_DIR...          each input once, no atheris
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # run as a script (nox -s fuzz): the references live in tests/
    sys.path.insert(0, _TESTS)

ALLOWED = (TypeError, ValueError)  # kbit.KbitError subclasses are added once kbit is imported
MAX_VALUES = 4096  # real tensors stay small; huge ones are expanded (stride 0) or on meta
warnings.simplefilter("ignore")


class Data:
    """The input's bytes as choices; zeros once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.i = data, 0

    def byte(self) -> int:
        if self.i >= len(self.data):
            return 0
        self.i += 1
        return self.data[self.i - 1]

    def int(self, lo: int, hi: int) -> int:
        v = self.byte() | self.byte() << 8 | self.byte() << 16
        return lo + v % (hi - lo + 1)

    def pick(self, seq: list) -> Any:
        return seq[self.byte() % len(seq)]

    def chance(self, k: int) -> bool:
        """True with probability about k/256."""
        return self.byte() < k


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_DTYPES = [torch.float64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.int8]
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39, 3e38, 65504.0, 1e-7, 1.0, -1.0]


def values(d: Data, n: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(d.int(0, 1 << 20))) * (10.0 ** d.int(-8, 8))
    for _ in range(d.int(0, 4)):
        if n:
            x[d.int(0, n - 1)] = d.pick(SPECIAL)
    if d.chance(20) and n:
        x[: d.int(0, n)] = 0.0
    if dtype.is_complex:
        return x.to(dtype)
    if dtype.is_floating_point:
        return x.to(dtype)
    return x.nan_to_num().clamp(-100, 100).to(dtype)


def tensor(d: Data, *, floating: bool = True) -> Any:
    """A tensor argument: mostly an ordinary one, sometimes hostile."""
    kind = d.byte()
    if kind >= 250:
        return d.pick([None, 3, 2.5, "A", [1.0, 2.0], (64,)])
    dtype = d.pick(DTYPES) if floating and d.byte() < 230 else d.pick(ODD_DTYPES + DTYPES)
    shape = d.pick([(d.int(0, MAX_VALUES),), (d.int(1, 64), d.int(1, 64)), (d.int(0, 4), d.int(0, 8), d.int(0, 16)),
                    ()])
    n = math.prod(shape)
    if n > MAX_VALUES:
        shape, n = (MAX_VALUES,), MAX_VALUES
    t = values(d, n, dtype).reshape(shape)
    if kind < 200:
        return t
    if kind < 215 and t.dim() == 2:
        return t.t()  # not contiguous
    if kind < 225:
        one = t.reshape(-1)[:1] if n else torch.zeros(1, dtype=dtype)
        return one.expand(d.pick([10, 2**31 + 5, 2**40]))  # huge, no memory
    if kind < 235:
        return torch.empty(d.pick([(2**40,), (2**31 + 1,), shape]), dtype=dtype, device="meta")
    if kind < 240 and t.dim() >= 1 and dtype.is_floating_point:
        return t.to_sparse()
    if kind < 245 and t.dim() >= 1 and dtype == torch.float32:
        return t.to_mkldnn()
    return t[::2] if t.dim() == 1 else t


def blocksize(d: Data, valid: list[int]) -> Any:
    k = d.byte()
    if k < 220:
        return d.pick(valid)
    return d.pick([0, -64, 48, 8192, 2**31, 64.0, "64", None, True])


def quant_type(d: Data) -> Any:
    return d.pick(["nf4", "fp4"]) if d.byte() < 240 else d.pick(["int4", "NF4", None, 4, b"nf4"])


# --- checks of results ------------------------------------------------------------------------------------------


def check_round_trip(A: torch.Tensor, B: torch.Tensor, absmax: torch.Tensor, blocksize: int, half_gap: float) -> None:
    assert B.shape == A.shape and B.dtype == A.dtype, (B.shape, A.shape, B.dtype, A.dtype)
    a, b = A.float().reshape(-1), B.float().reshape(-1)
    scale = absmax.float().repeat_interleave(blocksize)[: a.numel()]
    ok = a.isfinite() & scale.isfinite() & (scale < 1e30) & (scale > 1e-30)
    fi = torch.finfo(A.dtype)
    # the codebook's bound, plus rounding to the dtype: relative eps for normals, the subnormal spacing below
    tol = scale * half_gap + (a.abs() + b.abs()) * (2 * fi.eps) + fi.smallest_normal * fi.eps + 1e-30
    bad = ok & ~((a - b).abs() <= tol)
    assert not bool(bad.any()), f"round trip error above the bound at {bad.nonzero()[:3].flatten().tolist()}"


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    same = (got == expected) | (got.isnan() & expected.isnan())
    assert bool(same.all()), f"{what} differs from the format's definition at {(~same).nonzero()[:3].flatten().tolist()}"


# --- targets -------------------------------------------------------------------------------------------------------


def t_blockwise(d: Data, F: Any) -> None:
    A = tensor(d)
    bs = blocksize(d, [64, 128, 256, 512, 1024, 2048, 4096])
    codes, state = F.quantize_blockwise(A, blocksize=bs)
    assert codes.shape == A.shape and codes.dtype == torch.uint8
    assert state.absmax.numel() == -(-A.numel() // bs)
    if d.chance(60):  # a tampered state
        state = d.pick([lambda s: type(s)(s.absmax[:-1], s.code, s.blocksize, s.dtype, s.shape),
                        lambda s: type(s)(s.absmax.double(), s.code, s.blocksize, s.dtype, s.shape),
                        lambda s: type(s)(s.absmax, s.code[:100], s.blocksize, s.dtype, s.shape),
                        lambda s: type(s)(s.absmax, s.code, 48, s.dtype, s.shape)])(state)
        F.dequantize_blockwise(codes, state)
        return
    B = F.dequantize_blockwise(codes, state)
    from reference import dequantize_blockwise  # imported here: atheris instruments kbit first (main)

    assert_same(B, dequantize_blockwise(codes, state.code, state.absmax, bs, A.dtype), "dequantize_blockwise")
    gap = float((state.code[1:] - state.code[:-1]).max())
    check_round_trip(A, B, state.absmax, bs, gap / 2 + 2 / 65535)


def t_4bit(d: Data, F: Any) -> None:
    A = tensor(d)
    bs = blocksize(d, [32, 64, 128, 256, 512, 1024, 2048, 4096])
    qt = quant_type(d)
    packed, state = F.quantize_4bit(A, blocksize=bs, quant_type=qt, compress_statistics=d.chance(100))
    assert packed.dtype == torch.uint8 and packed.numel() == (A.numel() + 1) // 2
    B = F.dequantize_4bit(packed, state)
    from reference import dequantize_4bit_state

    assert_same(B, dequantize_4bit_state(packed, state), "dequantize_4bit")
    if not state.nested:
        check_round_trip(A, B, state.absmax, bs, 0.17)
    if d.chance(100) and A.dim() == 2 and A.shape[0] > 0:
        x = tensor(d)
        bias = tensor(d) if d.chance(100) else None
        y = F.gemv_4bit(x, packed, state, bias)
        assert y.shape[-1] == A.shape[0]


def t_from_dict(d: Data, F: Any) -> None:
    A = values(d, d.int(1, 512), d.pick(DTYPES))
    _, state = F.quantize_4bit(A, blocksize=d.pick([32, 64, 256]), compress_statistics=d.chance(128))
    items = state.as_dict(packed=d.chance(128))
    for _ in range(d.int(0, 3)):
        key = d.pick(sorted(items))
        what = d.byte() % 6
        if what == 0:
            del items[key]
        elif what == 1:
            items[key] = d.pick([None, -1, 10**400, float("nan"), "float32", [64, -1], torch.zeros(3), "x" * 1000])
        elif what == 2 and isinstance(items[key], torch.Tensor):
            items[key] = items[key][: max(0, items[key].numel() - d.int(1, 4))]
        elif what == 3 and isinstance(items[key], torch.Tensor) and items[key].dtype == torch.uint8:
            blob = bytearray(items[key].numpy().tobytes())
            for _ in range(d.int(1, 8)):
                if blob:
                    blob[d.int(0, len(blob) - 1)] = d.byte()
            items[key] = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
        elif what == 4:
            items[f"prefix.{key}"] = items.pop(key)
        else:
            items[d.pick(["nested_offset", "shape", "dtype", "blocksize", "bogus"])] = d.pick(
                [0, 2**70, "bfloat16", (4, 4), 64, 1e39])
    state2 = F.QuantState4bit.from_dict(items, device=d.pick(["cpu", "cpu", "meta", "foo", 0]))
    if state2.absmax.device.type == "cpu":
        state2.as_dict(packed=True)


def t_ops(d: Data, F: Any) -> None:
    ops = torch.ops.kbit
    code = F.dynamic_map(True)
    which = d.byte() % 6
    if which == 0:
        ops.quantize_blockwise(tensor(d), tensor(d) if d.chance(30) else code, blocksize(d, [64, 256]))
    elif which == 1:
        ops.dequantize_blockwise(tensor(d, floating=False), code, tensor(d), blocksize(d, [64, 256]),
                                 d.pick(DTYPES + ODD_DTYPES))
    elif which == 2:
        ops.quantize_4bit(tensor(d), blocksize(d, [32, 64]), quant_type(d))
    elif which == 3:
        ops.dequantize_4bit(tensor(d, floating=False), tensor(d), blocksize(d, [32, 64]), quant_type(d),
                            [d.int(-2, 64) for _ in range(d.int(0, 3))], d.pick(DTYPES + ODD_DTYPES))
    elif which == 4:
        ops.gemv_4bit(tensor(d), tensor(d, floating=False), tensor(d), tensor(d) if d.chance(60) else None,
                      d.int(-2, 64), d.int(-2, 64), blocksize(d, [32, 64]), quant_type(d))
    else:
        n = d.int(0, 600)
        p = values(d, n, d.pick(DTYPES))
        blocks = -(-n // 256)
        ops.adam_8bit_blockwise(p, values(d, n, p.dtype) if d.chance(230) else tensor(d),
                                torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                                torch.zeros(blocks), torch.zeros(blocks), code, F.dynamic_map(False),
                                d.pick([0.9, 1.0, -0.1]), 0.999, 1e-8, 0.0, 1e-3, d.pick([1, 2, 0, 2**31, -1]), 1.0,
                                d.chance(128))


def t_linear(d: Data, F: Any) -> None:
    import kbit.nn as knn

    in_f, out_f = d.pick([d.int(1, 64), 0, -1, 2.0]), d.pick([d.int(1, 64), 0])
    layer = knn.Linear4bit(in_f, out_f, bias=d.chance(128), compute_dtype=d.pick([None, *DTYPES, torch.int32]),
                           compress_statistics=d.chance(128), quant_type=quant_type(d),
                           blocksize=blocksize(d, [32, 64, 128]), device=d.pick([None, "cpu", "meta"]))
    x = tensor(d) if d.chance(60) else values(d, in_f * d.int(1, 3), d.pick(DTYPES)).reshape(-1, in_f)
    if d.chance(60):
        sd = layer.state_dict()
        key = d.pick(sorted(sd)) if sd else None
        if key is not None and d.chance(128):
            sd[key] = d.pick([torch.zeros(3), torch.zeros(3, dtype=torch.uint8), "x", None])
        try:
            knn.Linear4bit(in_f, out_f, bias=layer.bias is not None).load_state_dict(sd)
        except RuntimeError as e:  # torch collects the loading errors into one RuntimeError
            if not str(e).startswith("Error(s) in loading state_dict"):
                raise
        return
    with torch.no_grad():
        y = layer(x)
    assert y.shape[-1] == out_f


def t_optim(d: Data, F: Any) -> None:
    import kbit.optim as ko

    n = d.pick([d.int(1, 300), 4096 + d.int(0, 600)])
    dtype = d.pick(DTYPES) if d.chance(240) else d.pick(ODD_DTYPES)
    p = torch.nn.Parameter(values(d, n, dtype), requires_grad=dtype.is_floating_point or dtype.is_complex)
    cls = d.pick([ko.Adam8bit, ko.AdamW8bit])
    kwargs = {"lr": d.pick([1e-3, 0.1, 0.0, -1.0, 1e39, float("nan"), "x"]),
              "betas": d.pick([(0.9, 0.999), (0.0, 0.5), (1.0, 0.9), (0.9,), 0.9]),
              "eps": d.pick([1e-8, 0.0, -1e-8]), "weight_decay": d.pick([0.0, 0.01, 2**70, -1.0]),
              "min_8bit_size": d.pick([1, 256, 4096, 0, 10**9])}
    opt = cls([p], **kwargs)
    sane = True  # every step so far within what is judged (a huge one leaves torch's Adam inf too)
    for _ in range(d.int(1, 3)):
        finite = sane and bool(p.isfinite().all())
        g = values(d, n, dtype)
        try:
            p.grad = g.to(p.dtype) if d.chance(240) else tensor(d)
        except (RuntimeError, TypeError):  # torch refused the harness's gradient: not kbit's business
            p.grad = g.to(p.dtype)
        if d.chance(40):
            opt.param_groups[0].update({d.pick(sorted(kwargs)): d.pick([0.5, (1, 1), 2**70, -3, 1e39, 0])})
        group = opt.param_groups[0]
        # Judged where torch's Adam stays finite too: eps > 0 (else 0 / 0 where g = 0), AdamW's decay
        # 1 - lr * weight_decay in (0, 1], an effective gradient g + weight_decay * p whose square term
        # stays finite in float32 (kbit.h), and float32 parameters: in a block whose second moments
        # span more than the 8-bit map's range, the smallest are stored as 0 and their update is
        # m / eps, which a float16 parameter cannot hold (the format's limit, kbit.h).
        lr, eps, wd = (_num(group[k]) for k in ("lr", "eps", "weight_decay"))
        if finite and p.dtype == torch.float32 and p.grad is not None and p.numel() and bool(p.grad.isfinite().all()) and lr < 1e3 and eps > 0 \
                and lr * wd < 1 and float(p.grad.abs().max()) + wd * float(p.detach().abs().max()) < 1e18:
            before = p.detach().clone()
            opt.step()
            assert bool(p.isfinite().all()) or not bool(before.isfinite().all()), \
                "a finite step made a parameter non-finite"
            continue
        sane = False
        opt.step()


def _num(x: Any) -> float:
    """x as a float for the harness's own conditions (nan for what is not a number)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e300 else math.nan


TARGETS: list[Callable[[Data, Any], None]] = [t_blockwise, t_4bit, t_from_dict, t_ops, t_linear, t_optim]


def _torch_argument_parsing(e: RuntimeError) -> bool:
    """torch's dispatcher refusing an argument of the wrong type for an operator's schema (e.g. 64.0
    for `int blocksize`), before kbit's code runs: torch's behaviour for every operator."""
    text = str(e)
    return (text.startswith("kbit::") and ("Expected a value of type" in text or "argument(s)" in text)) or \
        text.startswith("There were no tensor arguments to this function")


def one_input(data: bytes) -> None:
    """One input: raises (a finding) on an undocumented exception or a wrong result."""
    import kbit
    from kbit import functional as F

    d = Data(data)
    target = TARGETS[d.byte() % len(TARGETS)]
    try:
        target(d, F)
    except (*ALLOWED, kbit.KbitError):
        pass
    except (RuntimeError, NotImplementedError) as e:  # NotImplementedError is a RuntimeError subclass
        if not (target is t_ops and _torch_argument_parsing(e)):
            raise


def replay(paths: list[str]) -> int:
    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    for f in files:
        try:
            one_input(f.read_bytes())
        except BaseException as e:
            raise RuntimeError(f"{f}: {type(e).__name__}: {e}") from e
    print(f"api_harness: replayed {len(files)} inputs")
    return 0


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--replay"]:
        return replay(argv[2:])
    import atheris

    with atheris.instrument_imports(include=["kbit"]):
        import kbit.functional
        import kbit.nn
        import kbit.optim  # noqa: F401
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
