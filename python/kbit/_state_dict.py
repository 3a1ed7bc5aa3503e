"""QuantState4bit <-> bitsandbytes' QuantState.as_dict format (the keys transformers saves next to a
4-bit weight): plain, or packed with the non-tensor items as one uint8 JSON tensor. Every item read is
checked (type, size, finiteness): a malformed state dict is a ValueError naming the item."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from ._checks import _DTYPES, _check_blocksize, _check_blocksize_4bit, _check_quant_type
from ._quant_state import QuantState4bit, QuantState8bit

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
