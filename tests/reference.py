"""What the tests take as truth: kbit's formats written from their definitions in plain torch (float32
as kbit.h specifies, no kbit code), and `record_peer` for the comparisons with bitsandbytes.

bitsandbytes is the oracle for *formats* (codes, absmax, packed bytes, state-dict keys, codebooks):
those are the same on every machine. Its *computed values* (dequantized tensors, layer outputs,
optimizer steps) come from CPU kernels it picks by the CPU's features, and on some CPUs they are
wrong (e.g. its dequantize_4bit of 2-D tensors whose rows are shorter than the blocksize on an
AVX-512 Intel Xeon). So a test asserts kbit == the reference here, and passes bitsandbytes' values
to record_peer, which warns (PeerDisagreement, naming the op and the CPU) where they differ from
the reference and never fails.
"""

from __future__ import annotations

import functools
import math
import platform
import warnings
from typing import Any

import torch
from kbit import functional as F

__all__ = [
    "GRID_HALF_SPAN",
    "PeerDisagreement",
    "cpu_model",
    "dequantize_4bit",
    "dequantize_4bit_state",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_blockwise",
    "record_peer",
]

GRID_HALF_SPAN = 32767.5  # (65536 - 1) / 2


# --- 8-bit blockwise -----------------------------------------------------------------------------------


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The format in plain torch, all in float32: per-block absmax; x = A / absmax (0 in an all-zero
    block) snapped to the nearest of 65536 evenly spaced points on [-1, 1], as bitsandbytes does;
    then the index of the code entry nearest to that point (ties: the lower index)."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.zeros(blocks * blocksize)
    padded[:n] = flat
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (padded.view(blocks, blocksize) / scale[:, None]).reshape(-1)[:n]
    bucket = torch.floor(((normed + 1.0) * GRID_HALF_SPAN + 0.5).clamp(0, 65535))
    point = bucket / GRID_HALF_SPAN - 1.0
    codes = (point[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)  # argmin: first minimum
    return codes.reshape(A.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """code[c] * absmax of its block, in float32, rounded once to dtype."""
    flat = codes.reshape(-1).long()
    scale = absmax.float().repeat_interleave(blocksize)[: flat.numel()]
    return (code.float()[flat] * scale).to(dtype).reshape(codes.shape)


# --- 4-bit NF4 / FP4 -----------------------------------------------------------------------------------


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """kbit.h's rule in plain torch, all float32: per block m = max |A| (NaN propagates), s = max(m, 1e-38);
    full blocks keep absmax m and x = A * (1 / s); a partial last block keeps s and x = A / s. The code
    is that of the entry whose rank is the number of midpoints x exceeds (NaN: all 15). Packed two per
    byte, first value high; an odd n pads with the code of 0."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    code = F.get_4bit_code(quant_type)
    order = torch.argsort(code, stable=True)  # FP4: +0 (code 0) ranks below -0 (code 8)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    absmax, normed = [], []
    floor = torch.tensor(1e-38, dtype=torch.float32)
    for start in range(0, n, blocksize):
        block = flat[start:start + blocksize]
        m = block.abs().max()
        s = torch.where(m < floor, floor, m)
        if block.numel() == blocksize:
            absmax.append(m)
            normed.append(block * (1.0 / s))
        else:
            absmax.append(s)
            normed.append(block / s)
    x = torch.cat(normed)
    if n % 2:
        x = torch.cat([x, torch.zeros(1)])
    rank = (~(x[:, None] <= bounds[None, :])).sum(dim=1)
    codes = order[rank].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), torch.stack(absmax)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, quant_type: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Codebook entry (first value in the high nibble) times its block's float32 absmax, in float32,
    rounded once to dtype; flat."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (F.get_4bit_code(quant_type)[codes] * scale).to(dtype)


def nested_absmax(state: Any) -> torch.Tensor:
    """The float32 absmax of a nested ("double quantized") state: its 8-bit codes dequantized with
    the nested state (code[c] * nested absmax, blocks of its blocksize), plus the offset."""
    s2 = state.state2
    codes = state.absmax.reshape(-1).long()
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[: codes.numel()]
    return s2.code.float()[codes] * scale + state.offset.float()


def dequantize_4bit_state(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The reference dequantization of a QuantState4bit (kbit's or bitsandbytes', nested or not),
    shaped as the state says."""
    absmax = nested_absmax(state) if state.nested else state.absmax
    n = math.prod(state.shape)
    return dequantize_4bit(packed, absmax, n, state.blocksize, state.quant_type, state.dtype).reshape(state.shape)


# --- bitsandbytes' computed values ------------------------------------------------------------------------


class PeerDisagreement(UserWarning):
    """bitsandbytes computed other values than the format's definition on this machine."""


_OUT_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def linear_tolerance(x: torch.Tensor, W: torch.Tensor, bias: Any = None,
                     compute: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ W.T (+ bias) in float64 from the float32 reference weight W, and what kbit.h allows a 4-bit
    matmul or GEMV to differ from it: float32 sums in any order (k * 2^-24 of sum |x| |W|), for
    bfloat16 W rounded to bfloat16 first (2^-8 of it), and the final rounding to the compute dtype.
    x and bias are taken as they are (already in the compute dtype)."""
    x64, W64 = x.double(), W.double()
    ref = x64 @ W64.T
    mag = x64.abs() @ W64.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    k = W.shape[-1]
    tol = mag * (max(k, 1) * 2.0**-24 + (2.0**-8 if compute == torch.bfloat16 else 0.0)) + ref.abs() * _OUT_EPS[compute]
    return ref, tol + 1e-30


def assert_linear_close(got: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias: Any = None,
                        compute: torch.dtype = torch.float32) -> None:
    """got is x @ W.T (+ bias) within linear_tolerance; the message names the worst output."""
    ref, tol = linear_tolerance(x.reshape(-1, W.shape[-1]), W, bias, compute)
    err = (got.reshape(ref.shape).double() - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, err / tol, torch.zeros_like(err))))
        raise AssertionError(f"{int(bad.sum())} of {err.numel()} outputs outside the bound; output {worst}: "
                             f"{got.reshape(-1)[worst].item()!r}, float64 gives {ref.reshape(-1)[worst].item()!r} "
                             f"(bound {tol.reshape(-1)[worst].item():.3g})")


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_peer(op: str, theirs: torch.Tensor, reference: torch.Tensor, *, rtol: float = 0.0,
                atol: float = 0.0) -> bool:
    """Whether bitsandbytes' `op` gave the reference's values (within rtol/atol; NaN equal to NaN);
    when it did not, a PeerDisagreement warning naming the op, the CPU and the first difference."""
    theirs, reference = theirs.reshape(-1), reference.reshape(-1)
    if theirs.shape != reference.shape:
        warnings.warn(PeerDisagreement(f"bitsandbytes {op} on {cpu_model()}: {theirs.numel()} values, "
                                       f"the reference has {reference.numel()}"), stacklevel=2)
        return False
    a, b = theirs.double(), reference.double()
    close = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return True
    bad = (~close).nonzero().flatten()
    i = int(bad[0])
    warnings.warn(PeerDisagreement(
        f"bitsandbytes {op} on {cpu_model()} differs from the reference in {bad.numel()} of {a.numel()} values "
        f"(first at {i}: {float(a[i])!r}, the reference {float(b[i])!r}); kbit matches the reference"),
        stacklevel=2)
    return False
