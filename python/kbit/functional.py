"""8-bit blockwise dynamic quantization and 4-bit (NF4/FP4) blockwise quantization of torch tensors.

Every argument is checked here, before any native code runs; a bad one raises TypeError or
ValueError saying what to change. CPU tensors go to the CPU library; CUDA tensors to the CUDA library
the runtime chose (on the tensor's device and current stream).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import _native
from ._errors import KbitNoBackendError

__all__ = [
    "BLOCKSIZES",
    "BLOCKSIZES_4BIT",
    "QUANT_TYPES_4BIT",
    "QuantState4bit",
    "QuantState8bit",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "get_4bit_code",
    "quantize_4bit",
    "quantize_blockwise",
]

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 8-bit blockwise quantization (kbit.h: KBIT_BLOCKWISE8_{MIN,MAX}_BLOCKSIZE)."""
CODEBOOK_SIZE = 256
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 4-bit quantization (kbit.h: KBIT_BLOCKWISE4_{MIN,MAX}_BLOCKSIZE)."""
QUANT_TYPES_4BIT = ("fp4", "nf4")
"""The 4-bit quantization types; kbit.h's KBIT_QUANT_FP4 and KBIT_QUANT_NF4 are their indices."""

# The 4-bit codebooks, in code order (kbit_math.h: kbit_code4_value): NF4, the quantiles of a normal
# distribution from the QLoRA paper; bitsandbytes' FP4: sign bit, then {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

# kbit.h's KBIT_DTYPE_*.
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_NAMES = "torch.float32, torch.float16 or torch.bfloat16"


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization codebook: 256 float32 values sorted ascending.

    A code is a sign bit (when `signed`), then E zero bits choosing the decimal exponent 10^-E, an
    indicator 1 bit, and the remaining bits as a linear fraction: 2^k evenly spaced midpoints of
    [0.1, 1] at scale 10^-E, with the most fraction bits at the largest scale. 0 and 1 complete it.
    This is the layout of bitsandbytes' `create_dynamic_map` (equal to it for the default arguments;
    only the layouts that fill all 2^total_bits codes exactly are supported).
    """
    sign_bits = 1 if signed else 0
    fraction_total = total_bits - sign_bits
    if total_bits != 8 or max_exponent_bits != 7:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits}) "
            "is not supported: only the full 8-bit map (max_exponent_bits=7, total_bits=8) is"
        )
    values: list[float] = []
    for e in range(max_exponent_bits):
        # The bucket with scale 10^-(max-1-e): fraction_total - max + e fraction bits.
        items = 2 ** (fraction_total - max_exponent_bits + e)
        # float32 midpoints, as the format is stored and as bitsandbytes computes them.
        edges = torch.linspace(0.1, 1.0, items + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        bucket = (10.0 ** (e - (max_exponent_bits - 1)) * mids).tolist()
        values += bucket
        if signed:
            values += [-v for v in bucket]
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:  # pragma: no cover - guarded by the argument check above
        raise AssertionError(f"dynamic map has {len(values)} values")
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _default_code(device: torch.device) -> torch.Tensor:
    return create_dynamic_map().to(device)


@dataclass(frozen=True, eq=False)
class QuantState8bit:
    """What `dequantize_blockwise` needs besides the codes."""

    absmax: torch.Tensor
    """float32, one per block: ceil(numel / blocksize)."""
    code: torch.Tensor
    """The 256-entry float32 codebook."""
    blocksize: int
    dtype: torch.dtype
    """The dtype of the quantized tensor (and of the dequantized one)."""
    shape: torch.Size


def _check_blocksize(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}")
    return blocksize


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous: call {name}.contiguous() first")


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


def _check_device(t: torch.Tensor, name: str, device: torch.device, ref: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}: move them to one device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{ref} is on {device}: kbit supports CPU and CUDA tensors only")


def _check_code(code: object, device: torch.device, ref: str) -> torch.Tensor:
    code = _check_tensor(code, "code")
    if code.dtype != torch.float32 or code.numel() != CODEBOOK_SIZE:
        raise ValueError(f"code must hold {CODEBOOK_SIZE} float32 values, got {code.numel()} of {code.dtype}")
    _check_device(code, "code", device, ref)
    _check_contiguous(code, "code")
    # Sortedness is checked where it costs no device synchronisation.
    if code.device.type == "cpu" and bool((code[1:] < code[:-1]).any()):
        raise ValueError("code must be sorted ascending (see create_dynamic_map())")
    return code


def _library(device: torch.device) -> _native.NativeLibrary:
    if device.type == "cpu":
        return _native.cpu_library()
    load = _native.cuda_library()
    if load.library is None:
        raise KbitNoBackendError(f"cannot run on {device}: {load.reason}")
    return load.library


def _stream(device: torch.device) -> Optional[int]:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


class _on_device:
    """torch.cuda.device(...) for CUDA tensors, nothing for CPU ones."""

    def __init__(self, device: torch.device) -> None:
        self._ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def quantize_blockwise(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 4096
) -> tuple[torch.Tensor, QuantState8bit]:
    """Quantize A block by block: each value becomes the index of the codebook entry nearest to
    value / absmax(block). Returns uint8 codes shaped like A and the state to dequantize them."""
    A = _check_tensor(A, "A")
    if A.dtype not in _DTYPES:
        raise TypeError(f"A must be {_DTYPE_NAMES}, got {A.dtype}")
    blocksize = _check_blocksize(blocksize)
    if A.numel() == 0:
        raise ValueError("A is empty: there is nothing to quantize")
    _check_device(A, "A", A.device, "A")
    _check_contiguous(A, "A")
    code = _default_code(A.device) if code is None else _check_code(code, A.device, "A")

    n = A.numel()
    out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=A.device)
    lib = _library(A.device)
    with _on_device(A.device):
        lib.quantize_blockwise_8bit(_DTYPES[A.dtype], A.data_ptr(), code.data_ptr(), out.data_ptr(),
                                    absmax.data_ptr(), n, blocksize, _stream(A.device))
    return out, QuantState8bit(absmax, code, blocksize, A.dtype, A.shape)


def dequantize_blockwise(
    codes: torch.Tensor, state: QuantState8bit, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The values the codes stand for: code[codes[i]] * absmax[i // blocksize], in state.dtype and
    state.shape (written into `out` when given)."""
    codes = _check_tensor(codes, "codes")
    if not isinstance(state, QuantState8bit):
        raise TypeError(f"state must be a QuantState8bit (from quantize_blockwise), got {type(state).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}")
    if state.dtype not in _DTYPES:
        raise TypeError(f"state.dtype must be {_DTYPE_NAMES}, got {state.dtype}")
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
    out = _dequantize_out(out, state.shape, state.dtype, device, "codes")
    lib = _library(device)
    with _on_device(device):
        lib.dequantize_blockwise_8bit(_DTYPES[state.dtype], codes.data_ptr(), code.data_ptr(), absmax.data_ptr(),
                                      out.data_ptr(), n, blocksize, _stream(device))
    return out


# --- 4-bit (NF4 / FP4) --------------------------------------------------------------------------------


def get_4bit_code(quant_type: str = "nf4", device: object = "cpu") -> torch.Tensor:
    """The 16-entry float32 codebook of `quant_type` ("nf4" or "fp4"), indexed by the 4-bit code."""
    _check_quant_type(quant_type)
    return _code_4bit(quant_type, torch.device(device)).clone()  # type: ignore[arg-type]


@functools.cache
def _code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        code = torch.tensor(_NF4_VALUES, dtype=torch.float32)
    else:
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0  # float32 quotients
        code = torch.cat([mags, -mags])
    return code.to(device)


@dataclass(frozen=True, eq=False)
class QuantState4bit:
    """What `dequantize_4bit` needs besides the packed codes."""

    absmax: torch.Tensor
    """float32, one per block: ceil(numel / blocksize)."""
    shape: torch.Size
    """The shape of the quantized tensor (and of the dequantized one)."""
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    """"nf4" or "fp4"."""
    code: torch.Tensor
    """The 16-entry float32 codebook of quant_type (informational: the kernels use their own copy)."""


def _check_quant_type(quant_type: object) -> str:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def _check_blocksize_4bit(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))}, got {blocksize!r}")
    return blocksize


def quantize_4bit(
    A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize A to 4-bit codes block by block, bit-compatible with bitsandbytes' quantize_4bit:
    each value becomes the code of the `quant_type` entry nearest to value / absmax(block) (see
    kbit.h for the exact float32 rule and NaN/inf). Returns the codes packed two per byte (first value
    in the high nibble) as a uint8 tensor of shape (ceil(numel / 2), 1), and the state."""
    A = _check_tensor(A, "A")
    if A.dtype not in _DTYPES:
        raise TypeError(f"A must be {_DTYPE_NAMES}, got {A.dtype}")
    blocksize = _check_blocksize_4bit(blocksize)
    quant_type = _check_quant_type(quant_type)
    if A.numel() == 0:
        raise ValueError("A is empty: there is nothing to quantize")
    _check_device(A, "A", A.device, "A")
    _check_contiguous(A, "A")

    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=A.device)
    lib = _library(A.device)
    with _on_device(A.device):
        lib.quantize_4bit(_DTYPES[A.dtype], QUANT_TYPES_4BIT.index(quant_type), A.data_ptr(), packed.data_ptr(),
                          absmax.data_ptr(), n, blocksize, _stream(A.device))
    return packed, QuantState4bit(absmax, A.shape, A.dtype, blocksize, quant_type, _code_4bit(quant_type, A.device))


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState4bit, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The values the packed codes stand for: code[c_i] * absmax[i // blocksize] (float32 product) in
    state.dtype and state.shape (written into `out` when given)."""
    packed = _check_tensor(packed, "packed")
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state must be a QuantState4bit (from quantize_4bit), got {type(state).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be torch.uint8, got {packed.dtype}")
    if state.dtype not in _DTYPES:
        raise TypeError(f"state.dtype must be {_DTYPE_NAMES}, got {state.dtype}")
    blocksize = _check_blocksize_4bit(state.blocksize)
    quant_type = _check_quant_type(state.quant_type)
    n = math.prod(state.shape)
    if packed.numel() == 0 or n == 0:
        raise ValueError("packed is empty: there is nothing to dequantize")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes but state.shape {tuple(state.shape)} needs "
                         f"{(n + 1) // 2} (two 4-bit codes per byte)")
    device = packed.device
    _check_device(packed, "packed", device, "packed")
    _check_contiguous(packed, "packed")
    absmax = _check_absmax(state.absmax, n, blocksize, device, "packed")
    out = _dequantize_out(out, state.shape, state.dtype, device, "packed")
    lib = _library(device)
    with _on_device(device):
        lib.dequantize_4bit(_DTYPES[state.dtype], QUANT_TYPES_4BIT.index(quant_type), packed.data_ptr(),
                            absmax.data_ptr(), out.data_ptr(), n, blocksize, _stream(device))
    return out
