"""The argument checks of kbit.functional: each bad argument is a TypeError or ValueError that says
what to change, raised before any native code runs."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _ops
from ._codebooks import CODEBOOK_SIZE

__all__ = ["BLOCKSIZES", "BLOCKSIZES_4BIT", "QUANT_TYPES_4BIT"]

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 8-bit blockwise quantization (kbit.h: KBIT_BLOCKWISE8_{MIN,MAX}_BLOCKSIZE)."""

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 4-bit quantization (kbit.h: KBIT_BLOCKWISE4_{MIN,MAX}_BLOCKSIZE)."""

QUANT_TYPES_4BIT = _ops.QUANT_TYPES_4BIT
"""The 4-bit quantization types; kbit.h's KBIT_QUANT_FP4 and KBIT_QUANT_NF4 are their indices."""

# kbit.h's KBIT_DTYPE_*.
_DTYPES = _ops.DTYPE_CODES

_DTYPE_NAMES = "torch.float32, torch.float16 or torch.bfloat16"


def _check_blocksize(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}")
    return blocksize


def _check_blocksize_4bit(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))}, got {blocksize!r}")
    return blocksize


def _check_quant_type(quant_type: object) -> str:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _ops.check_dense(t, name)
    return t


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous: call {name}.contiguous() first")


def _check_device(t: torch.Tensor, name: str, device: torch.device, ref: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}: move them to one device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{ref} is on {device}: kbit supports CPU and CUDA tensors only")


def _check_absmax(state_absmax: Any, n: int, blocksize: int, device: torch.device, ref: str) -> torch.Tensor:
    """state.absmax: float32, one per block, on `device` (the device of `ref`), contiguous."""
    absmax = _check_tensor(state_absmax, "state.absmax")
    _check_device(absmax, "state.absmax", device, ref)
    blocks = math.ceil(n / blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != blocks:
        raise ValueError(f"state.absmax must hold {blocks} float32 values (one per block of {blocksize}), "
                         f"got {absmax.numel()} of {absmax.dtype}")
    _check_contiguous(absmax, "state.absmax")
    return absmax


def _dequantize_out(out: Any, shape: torch.Size, dtype: torch.dtype, device: torch.device, ref: str) -> torch.Tensor:
    """The output of a dequantize: a new tensor, or the caller's `out` once checked."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    out = _check_tensor(out, "out")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} of shape {tuple(shape)}, got {out.dtype} of shape {tuple(out.shape)}")
    _check_device(out, "out", device, ref)
    _check_contiguous(out, "out")
    return out


def _check_code(code: object, device: torch.device, ref: str) -> torch.Tensor:
    code = _check_tensor(code, "code")
    if code.dtype != torch.float32 or code.numel() != CODEBOOK_SIZE:
        raise ValueError(f"code must hold {CODEBOOK_SIZE} float32 values, got {code.numel()} of {code.dtype}")
    _check_device(code, "code", device, ref)
    _check_contiguous(code, "code")
    # Sortedness is checked where it costs no device synchronisation (and not while torch.compile traces).
    if code.device.type == "cpu" and not torch.compiler.is_compiling() and bool((code[1:] < code[:-1]).any()):
        raise ValueError("code must be sorted ascending (see create_dynamic_map())")
    return code


def _check_codes_and_state(codes: object, state: object, state_type: type, ref: str, origin: str) -> torch.Tensor:
    """What both dequantize families check first: uint8 codes, a state of the family's type (made by
    `origin`) and a supported state dtype. Returns the codes tensor."""
    codes = _check_tensor(codes, ref)
    if not isinstance(state, state_type):
        raise TypeError(f"state must be a {state_type.__name__} (from {origin}), got {type(state).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"{ref} must be torch.uint8, got {codes.dtype}")
    if state.dtype not in _DTYPES:
        raise TypeError(f"state.dtype must be {_DTYPE_NAMES}, got {state.dtype}")
    return codes


def _parse_device(device: object, name: str = "device") -> torch.device:
    """torch.device(device), with a ValueError naming the argument instead of torch's RuntimeError."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device, a string such as 'cuda:0' or an index, "
                        f"got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name}={device!r} is not a device: {e}") from None
