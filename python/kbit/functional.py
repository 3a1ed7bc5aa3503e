"""8-bit blockwise dynamic quantization and 4-bit (NF4/FP4) blockwise quantization of torch tensors.

Every argument is checked here, before any native code runs; a bad one raises TypeError or
ValueError saying what to change. CPU tensors go to the CPU library; CUDA tensors to the CUDA library
the runtime chose (on the tensor's device and current stream).

The API is this module; its parts live beside it: the codebooks (kbit._codebooks), the argument checks
(kbit._checks), the state classes (kbit._quant_state) and their bitsandbytes dict format
(kbit._state_dict).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from . import _ops  # noqa: F401  (registers the torch.library ops this module calls)
from ._checks import (
    _DTYPE_NAMES,
    _DTYPES,
    BLOCKSIZES,
    BLOCKSIZES_4BIT,
    QUANT_TYPES_4BIT,
    _check_absmax,
    _check_blocksize,
    _check_blocksize_4bit,
    _check_code,
    _check_codes_and_state,
    _check_contiguous,
    _check_device,
    _check_quant_type,
    _check_tensor,
    _dequantize_out,
)
from ._codebooks import CODEBOOK_SIZE, _code_4bit, _default_code, create_dynamic_map, dynamic_map  # noqa: F401
from ._quant_state import NESTED_BLOCKSIZE, QuantState4bit, QuantState8bit

__all__ = [
    "BLOCKSIZES",
    "BLOCKSIZES_4BIT",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES_4BIT",
    "QuantState4bit",
    "QuantState8bit",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dynamic_map",
    "gemv_4bit",
    "get_4bit_code",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_blockwise",
]

def quantize_blockwise(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 4096
) -> tuple[torch.Tensor, QuantState8bit]:
    """Quantize A block by block: each value becomes the index of the codebook entry nearest to
    value / absmax(block). Returns uint8 codes shaped like A and the state to dequantize them.

    NaN values are ignored by a block's absmax and get code 0 (kbit.h); an inf makes its block's
    absmax inf."""
    A = _check_tensor(A, "A")
    if A.dtype not in _DTYPES:
        raise TypeError(f"A must be {_DTYPE_NAMES}, got {A.dtype}")
    blocksize = _check_blocksize(blocksize)
    if A.numel() == 0:
        raise ValueError("A is empty: there is nothing to quantize")
    _check_device(A, "A", A.device, "A")
    _check_contiguous(A, "A")
    code = _default_code(A.device) if code is None else _check_code(code, A.device, "A")
    out, absmax = torch.ops.kbit.quantize_blockwise(A, code, blocksize)
    return out, QuantState8bit(absmax, code, blocksize, A.dtype, A.shape)


def dequantize_blockwise(
    codes: torch.Tensor, state: QuantState8bit, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The values the codes stand for: code[codes[i]] * absmax[i // blocksize], in state.dtype and
    state.shape (written into `out` when given)."""
    codes = _check_codes_and_state(codes, state, QuantState8bit, "codes", "quantize_blockwise")
    blocksize = _check_blocksize(state.blocksize)
    n = codes.numel()
    if n == 0:
        raise ValueError("codes is empty: there is nothing to dequantize")
    if n != math.prod(state.shape):
        raise ValueError(f"codes has {n} elements but state.shape {tuple(state.shape)} needs {math.prod(state.shape)}")
    device = codes.device
    _check_device(codes, "codes", device, "codes")
    _check_contiguous(codes, "codes")
    absmax = _check_absmax(state.absmax, n, blocksize, device, "codes")
    code = _check_code(state.code, device, "codes")
    if out is None:
        return torch.ops.kbit.dequantize_blockwise(codes, code, absmax, blocksize, state.dtype).reshape(state.shape)
    out = _dequantize_out(out, state.shape, state.dtype, device, "codes")
    torch.ops.kbit.dequantize_blockwise_out(codes, code, absmax, blocksize, out)
    return out


def get_4bit_code(quant_type: str = "nf4", device: object = "cpu") -> torch.Tensor:
    """The 16-entry float32 codebook of `quant_type` ("nf4" or "fp4"), indexed by the 4-bit code."""
    _check_quant_type(quant_type)
    return _code_4bit(quant_type, torch.device(device)).clone()  # type: ignore[arg-type]


def quantize_4bit(
    A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False
) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize A to 4-bit codes block by block, bit-compatible with bitsandbytes' quantize_4bit:
    each value becomes the code of the `quant_type` entry nearest to value / absmax(block). Returns
    the codes packed two per byte (first value in the high nibble) as a uint8 tensor of shape
    (ceil(numel / 2), 1), and the state.

    NaN/inf (kbit.h): a block holding a NaN gets absmax NaN and every value the code of +1.0 (it
    dequantizes to NaN); an inf makes its block's absmax inf (it dequantizes to inf/NaN). Finite
    blocks are unaffected.

    compress_statistics=True also quantizes the block absmaxes (bitsandbytes' double quantization):
    their mean is stored as `offset` and absmax - offset is 8-bit quantized in blocks of 256."""
    A = _check_tensor(A, "A")
    if A.dtype not in _DTYPES:
        raise TypeError(f"A must be {_DTYPE_NAMES}, got {A.dtype}")
    blocksize = _check_blocksize_4bit(blocksize)
    quant_type = _check_quant_type(quant_type)
    if not isinstance(compress_statistics, bool):
        raise TypeError(f"compress_statistics must be True or False, got {compress_statistics!r}")
    if A.numel() == 0:
        raise ValueError("A is empty: there is nothing to quantize")
    _check_device(A, "A", A.device, "A")
    _check_contiguous(A, "A")
    packed, absmax = torch.ops.kbit.quantize_4bit(A, blocksize, quant_type)
    code = _code_4bit(quant_type, A.device)
    if not compress_statistics:
        return packed, QuantState4bit(absmax, A.shape, A.dtype, blocksize, quant_type, code)
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, QuantState4bit(qabsmax, A.shape, A.dtype, blocksize, quant_type, code, offset, state2)


def _absmax_4bit(state: QuantState4bit, n: int, device: torch.device, ref: str) -> torch.Tensor:
    """The float32 block absmaxes of a state, dequantized first when the state is nested."""
    if state.state2 is None:
        return _check_absmax(state.absmax, n, state.blocksize, device, ref)
    if not isinstance(state.state2, QuantState8bit):
        raise TypeError(f"state.state2 must be a QuantState8bit or None, got {type(state.state2).__name__}")
    blocks = math.ceil(n / state.blocksize)
    qabsmax = _check_tensor(state.absmax, "state.absmax")
    if qabsmax.dtype != torch.uint8 or qabsmax.numel() != blocks:
        raise ValueError(f"state.absmax of a nested state must hold {blocks} uint8 codes (one per block of "
                         f"{state.blocksize}), got {qabsmax.numel()} of {qabsmax.dtype}")
    offset = _check_tensor(state.offset, "state.offset")
    if offset.numel() != 1 or offset.dtype != torch.float32:
        raise ValueError(f"state.offset must be one float32 value, got {offset.numel()} of {offset.dtype}")
    _check_device(offset, "state.offset", device, ref)
    if state.state2.dtype != torch.float32:
        raise ValueError(f"state.state2.dtype must be torch.float32 (absmax is float32), got {state.state2.dtype}")
    absmax = dequantize_blockwise(qabsmax.reshape(state.state2.shape), state.state2).reshape(-1)
    return absmax + offset.reshape(())


def _check_state_4bit(packed: object, state: object, ref: str = "packed") -> tuple[torch.Tensor, QuantState4bit, int]:
    """packed and state of a 4-bit tensor, checked against each other; returns (packed, state, numel)."""
    packed = _check_codes_and_state(packed, state, QuantState4bit, ref, "quantize_4bit")
    _check_blocksize_4bit(state.blocksize)
    _check_quant_type(state.quant_type)
    n = math.prod(state.shape)
    if packed.numel() == 0 or n == 0:
        raise ValueError(f"{ref} is empty: there is nothing to dequantize")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{ref} has {packed.numel()} bytes but state.shape {tuple(state.shape)} needs "
                         f"{(n + 1) // 2} (two 4-bit codes per byte)")
    _check_device(packed, ref, packed.device, ref)
    _check_contiguous(packed, ref)
    return packed, state, n


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState4bit, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The values the packed codes stand for: code[c_i] * absmax[i // blocksize] (float32 product) in
    state.dtype and state.shape (written into `out` when given). Nested states (compress_statistics)
    have their absmax dequantized first, as bitsandbytes does."""
    packed, state, n = _check_state_4bit(packed, state)
    device = packed.device
    absmax = _absmax_4bit(state, n, device, "packed")
    if out is None:
        return torch.ops.kbit.dequantize_4bit(packed, absmax, state.blocksize, state.quant_type, list(state.shape),
                                              state.dtype)
    out = _dequantize_out(out, state.shape, state.dtype, device, "packed")
    torch.ops.kbit.dequantize_4bit_out(packed, absmax, state.blocksize, state.quant_type, out)
    return out


def _check_linear_4bit(A: Any, B: Any, quant_state: Any, bias: Any, one_row: bool) -> tuple:
    """gemv_4bit's and matmul_4bit's arguments: (A, B, state, numel of W, bias), checked."""
    B, state, n = _check_state_4bit(B, quant_state, "B")
    A = _check_tensor(A, "A")
    if len(state.shape) != 2:
        raise ValueError(f"quant_state.shape must be (n_out, k_in) of a 2-D weight, got {tuple(state.shape)}")
    n_out, k_in = state.shape
    if A.dtype not in _DTYPES:
        raise TypeError(f"A must be {_DTYPE_NAMES}, got {A.dtype}")
    if one_row and (A.dim() == 0 or A.shape[-1] != k_in or A.numel() != k_in):
        raise ValueError(f"A must have shape (..., {k_in}) with one row ({k_in} elements) for a weight of shape "
                         f"{tuple(state.shape)}, got {tuple(A.shape)}: use matmul_4bit for more rows")
    if A.dim() == 0 or A.shape[-1] != k_in:
        raise ValueError(f"A must have shape (..., {k_in}) for a weight of shape {tuple(state.shape)}, "
                         f"got {tuple(A.shape)}")
    _check_device(A, "A", B.device, "B")
    _check_contiguous(A, "A")
    if bias is not None:
        bias = _check_tensor(bias, "bias")
        if bias.dtype != A.dtype or bias.numel() != n_out:
            raise ValueError(f"bias must hold {n_out} values of A's dtype {A.dtype}, got {bias.numel()} of "
                             f"{bias.dtype}")
        _check_device(bias, "bias", B.device, "B")
        _check_contiguous(bias, "bias")
    return A, B, state, n, bias


def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, quant_state: QuantState4bit, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """A @ W.T (+ bias) for a single row A and a 4-bit weight W of shape (n_out, k_in), as
    torch.nn.functional.linear(A, dequantize_4bit(B, quant_state), bias) but without materializing W.

    A has shape (..., k_in) and exactly k_in elements (one token); it and bias (n_out values) are
    float32, float16 or bfloat16 of one dtype, the result has A's dtype and shape (..., n_out).
    The sum is accumulated in float32. NaN/inf in A, bias or the weight propagate to the outputs
    they touch, as in a plain matmul."""
    A, B, state, n, bias = _check_linear_4bit(A, B, quant_state, bias, one_row=True)
    n_out, k_in = state.shape
    absmax = _absmax_4bit(state, n, B.device, "B")
    return torch.ops.kbit.gemv_4bit(A, B, absmax, bias, n_out, k_in, state.blocksize, state.quant_type)


def matmul_4bit(
    A: torch.Tensor, B: torch.Tensor, quant_state: QuantState4bit, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """A @ W.T (+ bias) for A of shape (..., k_in) (any number of rows) and a 4-bit weight W of shape
    (n_out, k_in), as torch.nn.functional.linear(A, dequantize_4bit(B, quant_state), bias) but without
    materializing W: on the CPU a fused kernel reads the packed weight once per call (kbit.h:
    kbit_matmul_4bit); on CUDA each row of A reads it (use it for a few rows).

    A and bias (n_out values) are float32, float16 or bfloat16 of one dtype; the result has A's dtype
    and shape (..., n_out). The sum is accumulated in float32; for bfloat16, the CPU's AVX-512-BF16
    kernel rounds W' to bfloat16 first (as a bfloat16 matmul of the dequantized weight does).
    Differentiable in A and bias."""
    A, B, state, n, bias = _check_linear_4bit(A, B, quant_state, bias, one_row=False)
    return _matmul_4bit_absmax(A, B, state, _absmax_4bit(state, n, B.device, "B"), bias)


def _matmul_4bit_absmax(A: torch.Tensor, B: torch.Tensor, state: QuantState4bit, absmax: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """matmul_4bit with the state's float32 absmax given (Linear4bit keeps a nested state's); the op checks
    every tensor's dtype, device and size before native code."""
    n_out, k_in = state.shape
    return torch.ops.kbit.matmul_4bit(A, B, absmax, bias, n_out, k_in, state.blocksize, state.quant_type)
