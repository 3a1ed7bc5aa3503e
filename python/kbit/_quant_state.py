"""The quantization states: what dequantizing needs besides the codes. Serialized to and from
bitsandbytes' QuantState.as_dict format by kbit._state_dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._checks import _parse_device

__all__ = ["NESTED_BLOCKSIZE", "QuantState4bit", "QuantState8bit"]

NESTED_BLOCKSIZE = 256
"""The blocksize of the 8-bit quantization of a 4-bit state's absmax (compress_statistics=True)."""


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
        from ._state_dict import _state_to_dict

        return _state_to_dict(self, packed)

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: object = "cpu") -> QuantState4bit:
        """The state `as_dict` (kbit's or bitsandbytes') wrote, with its tensors moved to `device`.
        Keys may carry a prefix ("weight.absmax"); a missing, unknown or malformed item is a ValueError."""
        from ._state_dict import _state_from_dict

        return _state_from_dict(qs_dict, _parse_device(device))

    def to(self, device: object) -> QuantState4bit:
        """This state with its tensors on `device`."""
        dev = _parse_device(device)
        state2 = None if self.state2 is None else dataclasses.replace(
            self.state2, absmax=self.state2.absmax.to(dev), code=self.state2.code.to(dev))
        offset = None if self.offset is None else self.offset.to(dev)
        return dataclasses.replace(self, absmax=self.absmax.to(dev), code=self.code.to(dev), offset=offset,
                                   state2=state2)
