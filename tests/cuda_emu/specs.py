"""The kernel tests of the CUDA execution harness as data: for every entry point of kbit.h, the calls
(inputs and outputs, tests/cuda_emu/calls.py) and the rule the CUDA library's results are judged by
against libkbit_cpu.so's: byte for byte, or (GEMV) both within kbit.h's float32-summation bound of
the float64 product. test_cuda_emulation.py runs them on the emulated library, tests/gpu_check.py on
a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch
from kbit import _native
from kbit import functional as F

from .calls import Arg, Call, Emulation, run_call

__all__ = ["KERNEL_TEMPLATES", "RUNS", "SPECS", "Spec", "judge", "run_emulated"]

KBIT_DTYPE = {"f32": 0, "f16": 1, "bf16": 2}
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
NP_DTYPE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # bf16 as its bits
QUANT = {"fp4": 0, "nf4": 1}
BLOCKSIZES8 = [64, 128, 256, 512, 1024, 2048, 4096]
BLOCKSIZES4 = [32, *BLOCKSIZES8]

# (schedule, seed, grid cap): the first is the reference run; every run must give the same bytes.
RUNS = [
    (Emulation.IN_ORDER, 0, 0),
    (Emulation.REVERSED, 0, 0),
    (Emulation.RANDOM, 1234, 0),
    (Emulation.IN_ORDER, 0, 1),
    (Emulation.RANDOM, 99, 3),
]


# --- inputs --------------------------------------------------------------------------------------------


def values(n: int, dtype: str, seed: int, specials: int = 0, scale: float = 1.0) -> np.ndarray:
    """n normal values of dtype (bf16 as uint16 bits). With specials = a blocksize (and n >= 3 blocks
    of it): block 0 holds +inf, NaN and -inf, block 1 is all zeros, block 2 a subnormal and a huge
    value."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if specials and n >= 3 * specials:
        bs = specials
        x[3 % bs], x[bs // 2], x[bs - 2] = float("inf"), float("nan"), -float("inf")
        x[bs:2 * bs] = 0.0
        x[2 * bs + 1], x[2 * bs + 2] = 1e-40, 3e38
    t = x.to(TORCH_DTYPE[dtype])
    return t.view(torch.int16).numpy().view(np.uint16).copy() if dtype == "bf16" else t.numpy().copy()


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def absmax_values(nb: int, seed: int, specials: bool = False) -> np.ndarray:
    a = rng(seed).uniform(0.01, 4.0, nb).astype(np.float32)
    if specials and nb >= 3:
        a[0], a[1], a[2] = 0.0, np.inf, np.nan
    return a


def nblocks(n: int, bs: int) -> int:
    return -(-n // bs)


# --- the calls -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel test: `make(cpu)` gives the call (cpu: the CPU library, for inputs that are a
    previous step's outputs); `rule` how the emulated results are judged against the CPU's."""

    id: str
    make: Callable[[_native.NativeLibrary], Call]
    rule: str = "equal"  # or "gemv"
    gemv: Optional[tuple] = None  # (dtype, quant_type, n_out, k_in, blocksize, bias?[, m_rows]) for the rule


def blockwise8_specs() -> list[Spec]:
    specs = []
    for dtype in KBIT_DTYPE:
        for bs in BLOCKSIZES8:
            for n, specials in ((2 * bs + 37, False), (1, False), (3 * bs, True)):
                tag = f"{dtype}-bs{bs}-n{n}{'-special' if specials else ''}"

                def quantize(cpu, dtype=dtype, bs=bs, n=n, specials=specials):
                    return Call(f"q8-{dtype}-{bs}-{n}", "quantize_blockwise_8bit",
                                (KBIT_DTYPE[dtype], Arg("A"), Arg("code"), Arg("out"), Arg("absmax"), n, bs),
                                {"A": values(n, dtype, seed=bs + n, specials=bs if specials else 0),
                                 "code": F.dynamic_map(signed=True).numpy(),
                                 "out": np.zeros(n, np.uint8), "absmax": np.zeros(nblocks(n, bs), np.float32)},
                                ("out", "absmax"))

                def dequantize(cpu, dtype=dtype, bs=bs, n=n, specials=specials):
                    return Call(f"d8-{dtype}-{bs}-{n}", "dequantize_blockwise_8bit",
                                (KBIT_DTYPE[dtype], Arg("codes"), Arg("code"), Arg("absmax"), Arg("out"), n, bs),
                                {"codes": rng(n).integers(0, 256, n, dtype=np.uint8),
                                 "code": F.dynamic_map(signed=True).numpy(),
                                 "absmax": absmax_values(nblocks(n, bs), seed=bs, specials=specials),
                                 "out": np.zeros(n, NP_DTYPE[dtype])},
                                ("out",))

                specs += [Spec(f"quantize_8bit-{tag}", quantize), Spec(f"dequantize_8bit-{tag}", dequantize)]
    return specs


def blockwise4_specs() -> list[Spec]:
    specs = []
    for quant_type in QUANT:
        for dtype in KBIT_DTYPE:
            for bs in BLOCKSIZES4:
                for n, specials in ((2 * bs + 37, False), (1, False), (3 * bs, True)):
                    tag = f"{quant_type}-{dtype}-bs{bs}-n{n}{'-special' if specials else ''}"

                    def quantize(cpu, quant_type=quant_type, dtype=dtype, bs=bs, n=n, specials=specials, tag=tag):
                        return Call(f"q4-{tag}", "quantize_4bit",
                                    (KBIT_DTYPE[dtype], QUANT[quant_type], Arg("A"), Arg("out"), Arg("absmax"), n, bs),
                                    {"A": values(n, dtype, seed=3 * bs + n, specials=bs if specials else 0),
                                     "out": np.zeros((n + 1) // 2, np.uint8),
                                     "absmax": np.zeros(nblocks(n, bs), np.float32)},
                                    ("out", "absmax"))

                    def dequantize(cpu, quant_type=quant_type, dtype=dtype, bs=bs, n=n, specials=specials, tag=tag):
                        return Call(f"d4-{tag}", "dequantize_4bit",
                                    (KBIT_DTYPE[dtype], QUANT[quant_type], Arg("packed"), Arg("absmax"), Arg("out"),
                                     n, bs),
                                    {"packed": rng(n + bs).integers(0, 256, (n + 1) // 2, dtype=np.uint8),
                                     "absmax": absmax_values(nblocks(n, bs), seed=n, specials=specials),
                                     "out": np.zeros(n, NP_DTYPE[dtype])},
                                    ("out",))

                    specs += [Spec(f"quantize_4bit-{tag}", quantize), Spec(f"dequantize_4bit-{tag}", dequantize)]
    return specs


# (n_out, k_in, blocksize): whole blocks per row (word path); blocks straddling rows; odd k_in (byte
# path, rows starting at low nibbles); k_in below a block; k_in = 1; n_out not a multiple of the
# block's 4 warps; many rows (several CUDA blocks, grid-stride under a cap); the largest blocksize.
GEMV_SHAPES = [(5, 64, 64), (7, 104, 64), (3, 33, 32), (11, 77, 128), (9, 1, 32), (6, 5, 32), (37, 256, 32),
               (3, 4097, 4096), (2, 8192, 4096), (13, 300, 1024)]


def gemv_specs() -> list[Spec]:
    specs = []
    for dtype in KBIT_DTYPE:
        for quant_type in QUANT:
            for i, (n_out, k_in, bs) in enumerate(GEMV_SHAPES):
                use_bias = i % 2 == 1
                for unaligned in (False, True) if k_in % 8 == 0 else (False,):
                    path = "bytes" if unaligned or k_in % 8 else "words"
                    tag = f"{dtype}-{quant_type}-{n_out}x{k_in}-bs{bs}{'-bias' if use_bias else ''}-{path}"
                    if unaligned:
                        tag += "-unaligned"

                    def make(cpu, dtype=dtype, quant_type=quant_type, n_out=n_out, k_in=k_in, bs=bs,
                             use_bias=use_bias, unaligned=unaligned, tag=tag):
                        n = n_out * k_in
                        packed = rng(n).integers(0, 256, (n + 1) // 2, dtype=np.uint8)
                        if unaligned:  # the same bytes one past an aligned address
                            packed = np.concatenate([np.zeros(1, np.uint8), packed])
                        arrays = {"A": values(k_in, dtype, seed=k_in), "packed": packed,
                                  "absmax": absmax_values(nblocks(n, bs), seed=n_out),
                                  "out": np.zeros(n_out, NP_DTYPE[dtype])}
                        if use_bias:
                            arrays["bias"] = values(n_out, dtype, seed=n_out + 1)
                        return Call(f"gemv-{tag}", "gemv_4bit",
                                    (KBIT_DTYPE[dtype], QUANT[quant_type], Arg("A"), Arg("packed", int(unaligned)),
                                     Arg("absmax"), Arg("bias") if use_bias else None, Arg("out"), n_out, k_in, bs),
                                    arrays, ("out",))

                    specs.append(Spec(f"gemv_4bit-{tag}", make, rule="gemv",
                                      gemv=(dtype, quant_type, n_out, k_in, bs, use_bias)))
    return specs


# (m_rows, n_out, k_in, blocksize) of the matmul: a few rows of A over the GEMV's kinds of layout
# (whole blocks per row, blocks straddling rows, odd k_in), more rows than a grid-stride cap of blocks.
MATMUL_SHAPES = [(2, 5, 64, 64), (3, 7, 104, 64), (5, 3, 33, 32), (4, 6, 256, 128), (9, 2, 32, 32)]


def matmul_specs() -> list[Spec]:
    specs = []
    for dtype in KBIT_DTYPE:
        for quant_type in QUANT:
            for i, (m_rows, n_out, k_in, bs) in enumerate(MATMUL_SHAPES):
                use_bias = i % 2 == 0
                tag = f"{dtype}-{quant_type}-{m_rows}x{n_out}x{k_in}-bs{bs}{'-bias' if use_bias else ''}"

                def make(cpu, dtype=dtype, quant_type=quant_type, m_rows=m_rows, n_out=n_out, k_in=k_in, bs=bs,
                         use_bias=use_bias, tag=tag):
                    n = n_out * k_in
                    arrays = {"A": values(m_rows * k_in, dtype, seed=k_in + m_rows),
                              "packed": rng(n + m_rows).integers(0, 256, (n + 1) // 2, dtype=np.uint8),
                              "absmax": absmax_values(nblocks(n, bs), seed=n_out),
                              "out": np.zeros(m_rows * n_out, NP_DTYPE[dtype])}
                    if use_bias:
                        arrays["bias"] = values(n_out, dtype, seed=n_out + 1)
                    return Call(f"matmul-{tag}", "matmul_4bit",
                                (KBIT_DTYPE[dtype], QUANT[quant_type], Arg("A"), Arg("packed"), Arg("absmax"),
                                 Arg("bias") if use_bias else None, Arg("out"), m_rows, n_out, k_in, bs),
                                arrays, ("out",))

                specs.append(Spec(f"matmul_4bit-{tag}", make, rule="gemv",
                                  gemv=(dtype, quant_type, n_out, k_in, bs, use_bias, m_rows)))
    return specs


ADAM = dict(beta1=0.9, beta2=0.995, eps=1e-8, weight_decay=0.01, lr=1e-3, gnorm_scale=1.0)


def adam_call(id_: str, dtype: str, n: int, decoupled: int, step: int, p, g, s1, s2, a1, a2) -> Call:
    q = ADAM
    return Call(id_, "adam_8bit_blockwise",
                (KBIT_DTYPE[dtype], Arg("p"), Arg("g"), Arg("state1"), Arg("state2"), Arg("absmax1"), Arg("absmax2"),
                 Arg("qmap1"), Arg("qmap2"), q["beta1"], q["beta2"], q["eps"], q["weight_decay"], q["lr"], step,
                 q["gnorm_scale"], decoupled, n),
                {"p": p, "g": g, "state1": s1, "state2": s2, "absmax1": a1, "absmax2": a2,
                 "qmap1": F.dynamic_map(signed=True).numpy(), "qmap2": F.dynamic_map(signed=False).numpy()},
                ("p", "state1", "state2", "absmax1", "absmax2"))


def adam_specs() -> list[Spec]:
    specs = []
    for dtype in KBIT_DTYPE:
        for decoupled, name in ((0, "adam"), (1, "adamw")):
            for n, specials in ((1, False), (256, False), (1000, False), (2565, False), (600, True)):
                tag = f"{name}-{dtype}-n{n}{'-nonfinite' if specials else ''}"

                def first(cpu, dtype=dtype, decoupled=decoupled, n=n, specials=specials, tag=tag):
                    nb = nblocks(n, 256)
                    return adam_call(f"adam1-{tag}", dtype, n, decoupled, 1, values(n, dtype, seed=n),
                                     values(n, dtype, seed=n + 1, specials=256 if specials else 0, scale=0.1),
                                     np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(nb, np.float32),
                                     np.zeros(nb, np.float32))

                def second(cpu, first=first, dtype=dtype, decoupled=decoupled, n=n, tag=tag):
                    """Step 2 from the CPU's step 1: non-zero states and absmax."""
                    c1 = first(cpu)
                    out = {k: v.view(c1.arrays[k].dtype).copy() for k, v in run_call(cpu, c1).items()}
                    return adam_call(f"adam2-{tag}", dtype, n, decoupled, 2, out["p"],
                                     values(n, dtype, seed=n + 2, scale=0.1), out["state1"], out["state2"],
                                     out["absmax1"], out["absmax2"])

                specs += [Spec(f"adam_step1-{tag}", first), Spec(f"adam_step2-{tag}", second)]
    return specs


SPECS = [*blockwise8_specs(), *blockwise4_specs(), *gemv_specs(), *matmul_specs(), *adam_specs()]
KERNEL_TEMPLATES = ["quantize_blockwise8_kernel", "dequantize_blockwise8_kernel", "quantize4_kernel",
                    "dequantize4_kernel", "gemv4_kernel", "adam8_kernel"]


# --- judging -----------------------------------------------------------------------------------------------


def _gemv_reference(call: Call, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """float64 W' @ A (+ bias) and the bound of kbit.h's float32 summation (any order) plus the final
    rounding to the output dtype."""
    dtype, quant_type, n_out, k_in, bs, use_bias = spec.gemv[:6]
    m_rows = spec.gemv[6] if len(spec.gemv) > 6 else 1

    def as64(a):
        if dtype == "bf16":
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)

    offset = 1 if call.args[3].offset else 0
    packed = call.arrays["packed"][offset:]
    n = n_out * k_in
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    codebook = F.get_4bit_code(quant_type).double().numpy()
    W = (codebook[codes[:n]] * call.arrays["absmax"].astype(np.float64)[np.arange(n) // bs]).reshape(n_out, k_in)
    A = as64(call.arrays["A"]).reshape(m_rows, k_in)
    ref = (A @ W.T).reshape(-1)
    mag = (np.abs(A) @ np.abs(W).T).reshape(-1)
    if use_bias:
        bias = np.tile(as64(call.arrays["bias"]), m_rows)
        ref, mag = ref + bias, mag + np.abs(bias)
    out_eps = {"f32": 0.0, "f16": 2.0**-11, "bf16": 2.0**-8}[dtype]
    tol = mag * (max(k_in, 1) * 2.0**-24 + 1e-7) + np.abs(ref) * out_eps + 1e-30
    if m_rows > 1 or len(spec.gemv) > 6:  # kbit.h: a bfloat16 matmul may round W' to bfloat16 first
        tol += mag * (2.0**-8 if dtype == "bf16" else 0.0)
    return ref, tol


def judge(spec: Spec, call: Call, cpu_out: dict, emu_out: dict) -> Optional[str]:
    """None when the emulated results are what the CPU library's rule says; else what differs."""
    if spec.rule == "equal":
        for name in call.outputs:
            a, b = cpu_out[name], emu_out[name]
            if a.tobytes() != b.tobytes():
                bad = np.flatnonzero(a != b)
                return f"{name}: {bad.size} of {a.size} bytes differ from the CPU library's (first at byte {bad[0]})"
        return None
    ref, tol = _gemv_reference(call, spec)
    dtype = spec.gemv[0]
    for who, out in (("CPU library", cpu_out), ("emulated CUDA library", emu_out)):
        raw = out["out"].view(NP_DTYPE[dtype])
        got = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if dtype == "bf16" else \
            raw.astype(np.float64)
        err = np.abs(got - ref)
        if not (err <= tol).all():
            worst = int(np.argmax(err / tol))
            return f"the {who}'s {spec.id.split('-')[0]} output {worst} is {got[worst]!r}, float64 gives {ref[worst]!r} (bound {tol[worst]:.3g})"
    return None


def run_emulated(emu: Emulation, call: Call, runs=RUNS) -> dict:
    """The call under every run; raises AssertionError naming the run whose bytes differ."""
    first = None
    for schedule, seed, cap in runs:
        emu.configure(schedule, seed, cap)
        out = run_call(emu.lib, call)
        if first is None:
            first = out
            continue
        for name in call.outputs:
            if out[name].tobytes() != first[name].tobytes():
                raise AssertionError(f"{call.id}: {name} under schedule {schedule} (seed {seed}, grid cap {cap}) "
                                     f"differs from the in-order run: a race or a missing barrier")
    return first
