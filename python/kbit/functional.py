"""8-bit blockwise dynamic quantization and 4-bit (NF4/FP4) blockwise quantization of torch tensors.

Every argument is checked here, before any native code runs; a bad one raises TypeError or
ValueError saying what to change. CPU tensors go to the CPU library; CUDA tensors to the CUDA library
the runtime chose (on the tensor's device and current stream).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import _ops

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

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 8-bit blockwise quantization (kbit.h: KBIT_BLOCKWISE8_{MIN,MAX}_BLOCKSIZE)."""
CODEBOOK_SIZE = 256
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The blocksizes of 4-bit quantization (kbit.h: KBIT_BLOCKWISE4_{MIN,MAX}_BLOCKSIZE)."""
QUANT_TYPES_4BIT = _ops.QUANT_TYPES_4BIT
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
_DTYPES = _ops.DTYPE_CODES
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


_CODEBOOKS: dict[tuple[str, torch.device], torch.Tensor] = {}


# torch.compile treats a codebook as a constant: it calls this eagerly instead of tracing into it
# (the maps are built with Python floats, which Dynamo cannot trace).
@torch.compiler.assume_constant_result
def _codebook(name: str, device: torch.device) -> torch.Tensor:
    """A shared, cached codebook ("dynamic", "dynamic_unsigned", "nf4", "fp4") on `device`; do not modify it."""
    key = (name, device)
    code = _CODEBOOKS.get(key)
    if code is None:
        if name in ("nf4", "fp4"):
            code = _build_code_4bit(name)
        else:
            code = create_dynamic_map(signed=name == "dynamic")
        code = _CODEBOOKS.setdefault(key, code.to(device))
    return code


def _default_code(device: torch.device) -> torch.Tensor:
    return _codebook("dynamic", device)


def dynamic_map(signed: bool, device: object = "cpu") -> torch.Tensor:
    """create_dynamic_map(signed), cached per device (shared: do not modify it)."""
    return _codebook("dynamic" if signed else "dynamic_unsigned", torch.device(device))  # type: ignore[arg-type]


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
    _ops.check_dense(t, name)
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
    # Sortedness is checked where it costs no device synchronisation (and not while torch.compile traces).
    if code.device.type == "cpu" and not torch.compiler.is_compiling() and bool((code[1:] < code[:-1]).any()):
        raise ValueError("code must be sorted ascending (see create_dynamic_map())")
    return code


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


# --- 4-bit (NF4 / FP4) --------------------------------------------------------------------------------

NESTED_BLOCKSIZE = 256
"""The blocksize of the 8-bit quantization of a 4-bit state's absmax (compress_statistics=True)."""


def get_4bit_code(quant_type: str = "nf4", device: object = "cpu") -> torch.Tensor:
    """The 16-entry float32 codebook of `quant_type` ("nf4" or "fp4"), indexed by the 4-bit code."""
    _check_quant_type(quant_type)
    return _code_4bit(quant_type, torch.device(device)).clone()  # type: ignore[arg-type]


def _code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    return _codebook(quant_type, device)


def _build_code_4bit(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0  # float32 quotients
    return torch.cat([mags, -mags])


@dataclass(frozen=True, eq=False)
class QuantState4bit:
    """What `dequantize_4bit` and `gemv_4bit` need besides the packed codes.

    Plain: `absmax` holds one float32 per block. Nested (compress_statistics=True, bitsandbytes'
    "double quantization"): `absmax` holds one uint8 code per block, the 8-bit blockwise quantization
    (blocksize 256, signed dynamic map) of absmax - offset, described by `state2`; `offset` is the
    float32 mean of the block absmaxes, a 0-dim tensor."""

    absmax: torch.Tensor
    """float32 (plain) or uint8 (nested), one per block: ceil(numel / blocksize)."""
    shape: torch.Size
    """The shape of the quantized tensor (and of the dequantized one)."""
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    """"nf4" or "fp4"."""
    code: torch.Tensor
    """The 16-entry float32 codebook of quant_type (informational: the kernels use their own copy)."""
    offset: Optional[torch.Tensor] = None
    """Nested states only: the 0-dim float32 mean subtracted from absmax before its quantization."""
    state2: Optional[QuantState8bit] = None
    """Nested states only: the 8-bit state of the absmax codes."""

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a flat dict, in bitsandbytes' QuantState.as_dict format (the keys transformers
        saves next to a 4-bit weight). packed=True: tensors only, the non-tensor items as a uint8 JSON
        tensor under "quant_state.bitsandbytes__<quant_type>" (safetensors can store it)."""
        return _state_to_dict(self, packed)

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: object = "cpu") -> QuantState4bit:
        """The state `as_dict` (kbit's or bitsandbytes') wrote, with its tensors moved to `device`.
        Keys may carry a prefix ("weight.absmax"); a missing, unknown or malformed item is a ValueError."""
        return _state_from_dict(qs_dict, _parse_device(device))

    def to(self, device: object) -> QuantState4bit:
        """This state with its tensors on `device`."""
        dev = _parse_device(device)
        state2 = None if self.state2 is None else dataclasses.replace(
            self.state2, absmax=self.state2.absmax.to(dev), code=self.state2.code.to(dev))
        offset = None if self.offset is None else self.offset.to(dev)
        return dataclasses.replace(self, absmax=self.absmax.to(dev), code=self.code.to(dev), offset=offset,
                                   state2=state2)


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


# --- QuantState4bit <-> bitsandbytes' as_dict format ----------------------------------------------------

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_PACKED_MAX_BYTES = 1 << 16
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_SCALAR_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_KEYS = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object, key: str) -> torch.dtype:
    if not isinstance(name, str):  # never repr'd: it may be anything, e.g. a huge tensor
        raise ValueError(f"quant state item {key!r} must be a string naming float32, float16 or bfloat16, "
                         f"got {type(name).__name__}")
    dtype = getattr(torch, name, None) if len(name) <= 32 else None
    if dtype not in _DTYPES:
        raise ValueError(f"quant state item {key!r} must name float32, float16 or bfloat16, got {name[:40]!r}")
    return dtype  # type: ignore[return-value]


def _state_to_dict(state: QuantState4bit, packed: bool) -> dict[str, Any]:
    if state.absmax.is_meta or (state.offset is not None and state.offset.is_meta):
        raise ValueError("a quant state on the meta device has no values to write: move it to a real device "
                         "(state.to('cpu')) first")
    d: dict[str, Any] = {"quant_type": state.quant_type, "absmax": state.absmax, "blocksize": state.blocksize,
                         "quant_map": state.code, "dtype": _dtype_name(state.dtype), "shape": tuple(state.shape)}
    if state.state2 is not None:
        if state.offset is None:
            raise ValueError("a nested QuantState4bit (state2 set) needs its offset")
        d.update({"nested_absmax": state.state2.absmax, "nested_blocksize": state.state2.blocksize,
                  "nested_quant_map": state.state2.code.clone(), "nested_dtype": _dtype_name(state.state2.dtype),
                  "nested_offset": float(state.offset)})
    if not packed:
        return d
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
    blob = json.dumps(scalars).encode("utf-8")
    tensors[_PACKED_PREFIX + state.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return tensors


def _unpack_items(qs_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The items with prefixes stripped ("weight.absmax" -> "absmax") and the packed JSON item unpacked."""
    if not isinstance(qs_dict, Mapping):
        raise TypeError(f"qs_dict must be a mapping of quant state items, got {type(qs_dict).__name__}")
    items: dict[str, Any] = {}
    packed = [k for k in qs_dict if isinstance(k, str) and "quant_state." in k]
    if len(packed) > 1:
        raise ValueError(f"qs_dict holds {len(packed)} packed quant_state items ({packed}): pass one weight's items")
    for key, value in qs_dict.items():
        if key in packed:
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
                raise ValueError(f"{key!r} must be a 1-D uint8 tensor of JSON bytes")
            if value.numel() > _PACKED_MAX_BYTES or value.is_meta:
                raise ValueError(f"{key!r} holds {value.numel()} bytes{' on meta' if value.is_meta else ''}: a quant "
                                 f"state's JSON item is a few hundred bytes (at most {_PACKED_MAX_BYTES} are read)")
            try:
                scalars = json.loads(value.cpu().contiguous().numpy().tobytes().decode("utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise ValueError(f"{key!r} does not hold a JSON object: {type(e).__name__}: {str(e)[:100]}") from None
            if not isinstance(scalars, dict) or scalars.get("quant_type") != key.rsplit("__", 1)[-1]:
                raise ValueError(f"{key!r} must hold a JSON object whose quant_type matches the key's suffix")
            items.update(scalars)
        else:
            items[str(key).rsplit(".", 1)[-1]] = value
    unknown = sorted(set(items) - set(_TENSOR_KEYS) - set(_SCALAR_KEYS))
    if unknown:
        raise ValueError(f"unknown quant state items {unknown}; expected {_TENSOR_KEYS + _SCALAR_KEYS}")
    return items


def _require(items: Mapping[str, Any], key: str, kind: Any) -> Any:
    if key not in items:
        raise ValueError(f"quant state item {key!r} is missing")
    value = items[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"quant state item {key!r} must be {names}, got {type(value).__name__}")
    return value


def _state_shape(value: Any) -> torch.Size:
    if len(value) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value):
        raise ValueError(f"quant state item 'shape' must be a list of ints >= 0, got {str(value)[:80]}")
    return torch.Size(value)


def _finite_float(value: Any, key: str) -> float:
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not (math.isfinite(f) and abs(f) <= 3.4028234663852886e38):  # finite in float32, as it is stored
        raise ValueError(f"quant state item {key!r} must be a finite float32 number, got {str(value)[:40]}")
    return f


def _state_from_dict(qs_dict: Mapping[str, Any], device: torch.device) -> QuantState4bit:
    items = _unpack_items(qs_dict)
    quant_type = _check_quant_type(_require(items, "quant_type", str))
    shape = _state_shape(_require(items, "shape", (list, tuple)))
    dtype = _dtype_from_name(_require(items, "dtype", str), "dtype")
    blocksize = _check_blocksize_4bit(_require(items, "blocksize", int))
    absmax = _require(items, "absmax", torch.Tensor).to(device)
    code = _require(items, "quant_map", torch.Tensor).to(device)
    present = [k for k in _NESTED_KEYS if k in items]
    if not present:
        return QuantState4bit(absmax, shape, dtype, blocksize, quant_type, code)
    if len(present) != len(_NESTED_KEYS):
        raise ValueError(f"a nested quant state needs all of {_NESTED_KEYS}, got only {present}")
    offset = torch.tensor(_finite_float(_require(items, "nested_offset", (int, float)), "nested_offset"),
                          dtype=torch.float32, device=device)
    nested_absmax = _require(items, "nested_absmax", torch.Tensor).to(device)
    state2 = QuantState8bit(nested_absmax, _require(items, "nested_quant_map", torch.Tensor).to(device),
                            _check_blocksize(_require(items, "nested_blocksize", int)),
                            _dtype_from_name(items["nested_dtype"], "nested_dtype"), torch.Size([absmax.numel()]))
    return QuantState4bit(absmax, shape, dtype, blocksize, quant_type, code, offset, state2)


def _check_quant_type(quant_type: object) -> str:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def _check_blocksize_4bit(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))}, got {blocksize!r}")
    return blocksize


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
