"""4-bit (NF4/FP4) linear layer, state-dict compatible with bitsandbytes' Linear4bit.

`Linear4bit.weight` is a non-trainable Parameter that holds the float weight until the layer is
quantized, then the packed 4-bit codes (uint8, shape (ceil(out * in / 2), 1)); the layer's
`quant_state` (a kbit.functional.QuantState4bit) holds the rest. The state dict holds `weight`, `bias`
and the quant state under `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map` and `weight.quant_state.bitsandbytes__<nf4|fp4>`, the keys bitsandbytes and
transformers use, so checkpoints load in either library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _ops
from . import functional as F
from ._errors import KbitLoadError, KbitWarning

__all__ = ["Linear4bit", "load_4bit_checkpoint", "quantization_config_4bit", "replace_linear_4bit", "save_4bit_checkpoint"]


def _check_features(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_compute_dtype(dtype: object) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in F._DTYPES:
        raise TypeError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype  # type: ignore[return-value]


# Saved absmax in these dtypes is upcast to float32 at load: exact (every float16/bfloat16 value is a
# float32 value), and bitsandbytes writes such checkpoints itself.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def _float32_stats(t: torch.Tensor, key: str, count: int, what: str) -> Union[torch.Tensor, str]:
    """A 1-D float32 tensor of `count` values (float16/bfloat16 upcast exactly), or what is wrong with it."""
    if t.dim() != 1 or t.numel() != count or (t.dtype != torch.float32 and t.dtype not in _UPCAST_DTYPES):
        return (f"{key}: must be a 1-D float32 (or float16/bfloat16) tensor of {count} values ({what}), "
                f"got {t.dtype} of shape {tuple(t.shape)}")
    return t.float().contiguous()


def _checked_loaded_state(state: F.QuantState4bit, wkey: str) -> Union[F.QuantState4bit, str]:
    """A loaded state whose tensors all have the dtype and shape the kernels need, or what is wrong,
    naming the full key (checked at load, so nothing fails later at a forward)."""
    blocks = math.ceil(math.prod(state.shape) / state.blocksize)
    code = state.code
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != 16:
        return f"{wkey}.quant_map: must be a 1-D float32 tensor of 16 values, got {code.dtype} of shape {tuple(code.shape)}"
    if not torch.equal(code.cpu(), F._code_4bit(state.quant_type, torch.device("cpu"))):
        return f"{wkey}.quant_map: is not the {state.quant_type} codebook (the 4-bit kernels know only nf4 and fp4)"
    if state.state2 is None:
        absmax = _float32_stats(state.absmax, f"{wkey}.absmax", blocks, f"one per block of {state.blocksize}")
        if isinstance(absmax, str):
            return absmax
        return dataclasses.replace(state, absmax=absmax, code=code.contiguous())
    s2 = state.state2
    qabsmax = state.absmax
    if qabsmax.dtype != torch.uint8 or qabsmax.dim() != 1 or qabsmax.numel() != blocks:
        return (f"{wkey}.absmax: a nested (double-quantized) state's absmax must be a 1-D uint8 tensor of {blocks} "
                f"codes (one per block of {state.blocksize}), got {qabsmax.dtype} of shape {tuple(qabsmax.shape)}")
    nested = _float32_stats(s2.absmax, f"{wkey}.nested_absmax", math.ceil(blocks / s2.blocksize),
                            f"one per block of {s2.blocksize} absmax codes")
    if isinstance(nested, str):
        return nested
    c2 = s2.code
    if c2.dtype != torch.float32 or c2.dim() != 1 or c2.numel() != F.CODEBOOK_SIZE:
        return (f"{wkey}.nested_quant_map: must be a 1-D float32 tensor of {F.CODEBOOK_SIZE} values, got {c2.dtype} "
                f"of shape {tuple(c2.shape)}")
    if s2.dtype != torch.float32:
        return (f"{wkey}.quant_state.bitsandbytes__{state.quant_type}: nested_dtype must be float32 (the absmax "
                f"it describes is float32), got {str(s2.dtype).removeprefix('torch.')}")
    state2 = dataclasses.replace(s2, absmax=nested, code=c2.contiguous())
    return dataclasses.replace(state, absmax=qabsmax.contiguous(), code=code.contiguous(), state2=state2)


class Linear4bit(nn.Module):
    """y = x W^T + b with W stored in 4 bits (NF4 or FP4, blockwise absmax, optionally nested).

    The weight is quantized when the layer is built from a float layer (`from_linear`), when it is
    built with `device=` "cpu" or "cuda", when the module is moved or cast (`.to(...)`, `.cuda()`,
    `.cpu()`, `.half()`, ... on it or on a parent), or at the latest on the first forward. Built with
    device=None it keeps a float weight (nn.Linear's initialisation) until then; with device="meta"
    it allocates nothing, for load_state_dict to fill.

    forward: on the CPU, any number of rows runs a fused 4-bit matmul, W never materialized. Without
    gradients (eval, torch.no_grad(), inference_mode) and with in_features a multiple of the blocksize
    it is the tiled kernel (torch.ops.kbit.matmul_4bit_tiled) on a copy of the weight in the CPU's
    tiled layout, made on the first such forward (see `cpu_layout`; for bfloat16 on AVX-512-BF16
    CPUs the codebook is rounded to bfloat16, each block's sum scaled in float32); otherwise
    kbit.functional.matmul_4bit on the packed weight (for bfloat16 compute on AVX-512-BF16 CPUs W'
    is rounded to bfloat16 first, as a bfloat16 matmul of the dequantized weight does). On
    CUDA a single row (x.numel() == in_features) runs the 4-bit GEMV kernel; more rows dequantize W
    and call torch's linear (cuBLAS). Both are differentiable
    in x and bias (the 4-bit weight itself is frozen). Inputs are
    cast to `compute_dtype` (default: x's dtype) and the result back to x's dtype.
    """

    # The CPU forward without gradients keeps a second copy of the weight in the CPU's tiled layout
    # (kbit.h): n_out * in_features / 2 bytes plus a float32 scale per block (1.25x the packed weight
    # at blocksize 64, on top of it). False: no copy (the fused kernel on the bitsandbytes layout;
    # slower). Per layer or on the class. See drop_cpu_layout.
    cpu_layout: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, device: Any = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        if not isinstance(compress_statistics, bool):
            raise TypeError(f"compress_statistics must be True or False, got {compress_statistics!r}")
        self.compress_statistics = compress_statistics
        self.quant_type = F._check_quant_type(quant_type)
        self.blocksize = F._check_blocksize_4bit(blocksize)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in F._DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        self.quant_state: Optional[F.QuantState4bit] = None
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if weight.device.type != "meta":
            self._init_like_linear()
            if device is not None:  # placed explicitly: quantize now; else on the first move or forward
                self.quantize_()

    def _init_like_linear(self) -> None:
        # nn.Linear's initialisation (kaiming-uniform weight, uniform bias in +-1/sqrt(in_features)).
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: Optional[torch.dtype] = None,
                    compress_statistics: bool = True, quant_type: str = "nf4", blocksize: int = 64,
                    device: Any = None) -> Linear4bit:
        """A quantized copy of `linear` (on `device`, default: linear's device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        device = weight.device if device is None else torch.device(device)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                    compress_statistics, quant_type, blocksize, device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.to(device, copy=True).contiguous(), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device, copy=True))
        layer.quantize_()
        return layer

    @property
    def is_quantized(self) -> bool:
        return self.quant_state is not None

    def quantize_(self) -> Linear4bit:
        """Quantize the float weight in place (nothing to do when already quantized)."""
        if self.quant_state is not None:
            return self
        packed, state = F.quantize_4bit(self.weight.detach().contiguous(), blocksize=self.blocksize,
                                        quant_type=self.quant_type, compress_statistics=self.compress_statistics)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """W as a float tensor of shape (out_features, in_features)."""
        if self.quant_state is None:
            return self.weight.detach()
        return F.dequantize_4bit(self.weight, self.quant_state)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        super()._apply(fn, recurse)  # casts touch floating point tensors only: packed codes stay uint8
        self.drop_cpu_layout()
        if self.quant_state is not None:
            self.quant_state = self.quant_state.to(self.weight.device)
        elif self.weight.device.type in ("cpu", "cuda"):
            self.quantize_()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked before any cast or copy: a mismatched (e.g. expanded, stride-0) input fails at once.
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Linear4bit expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"Linear4bit expects a floating-point input, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit({self.in_features}, {self.out_features}) expects inputs of shape "
                             f"(..., {self.in_features}), got {tuple(x.shape)}")
        if self.quant_state is None:
            self.quantize_()
        state = self.quant_state
        assert state is not None
        compute = self.compute_dtype or x.dtype
        inp = x.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        if compute in F._DTYPES and inp.device.type == "cpu":  # a fused kernel, any rows
            tiled = self._cpu_tiled(state, inp, bias)
            if tiled is not None:  # no gradient wanted: the tiled copy of the weight
                n_out, k_in = state.shape
                out = _ops.matmul_4bit_tiled_own(inp.contiguous(), tiled[0], tiled[1],
                                                 None if bias is None else bias.contiguous(), n_out, k_in,
                                                 state.blocksize, state.quant_type)
            else:  # the packed layout's, differentiable
                out = F._matmul_4bit_absmax(inp.contiguous(), self.weight, state, self._float_absmax(state),
                                            None if bias is None else bias.contiguous())
        elif x.numel() == self.in_features and compute in F._DTYPES:
            out = F.gemv_4bit(inp.contiguous(), self.weight, state, None if bias is None else bias.contiguous())
        else:
            out = nn.functional.linear(inp, self.dequantized_weight().to(compute), bias)
        return out.to(x.dtype)

    def _cpu_tiled(self, state: F.QuantState4bit, inp: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The weight in the CPU's tiled layout (kbit.h), built on the first CPU forward that wants no
        gradient and kept until the weight or its state changes; None where it does not apply: a
        gradient is wanted, in_features is not a multiple of the blocksize, `cpu_layout` is False, or
        under torch.compile (the copy's validity is a data-pointer check, which dynamo cannot trace)."""
        if not self.cpu_layout or state.shape[1] % state.blocksize or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and (inp.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        weight = self._parameters["weight"]
        # An inference tensor (made under torch.inference_mode) has no version counter: only its address
        # and state are compared, as after a write through .data (drop_cpu_layout).
        key = (state, weight.data_ptr(), -1 if weight.is_inference() else weight._version)
        cached = self.__dict__.get("_tiled_cache")
        if cached is None or cached[0][0] is not state or cached[0][1] != key[1] or cached[0][2] != key[2]:
            n_out, k_in = state.shape
            self.__dict__["_tiled_cache"] = None  # the old copy goes before the new one is built
            tiled = torch.ops.kbit.repack_4bit_tiled(weight.detach(), self._float_absmax(state), n_out, k_in,
                                                     state.blocksize)
            cached = (key, tiled)
            self.__dict__["_tiled_cache"] = cached
        return cached[1]

    def drop_cpu_layout(self) -> None:
        """Forget the tiled copy of the weight (the next no-grad CPU forward makes a new one). Needed only
        after writing the packed weight through `weight.data`, which torch's version counter does not
        see, or in place into a weight made under torch.inference_mode (which has no version counter);
        loads, moves and other in-place writes to `weight` are noticed."""
        self.__dict__.pop("_tiled_cache", None)

    def _float_absmax(self, state: F.QuantState4bit) -> torch.Tensor:
        """The state's float32 block absmaxes: a nested state's are dequantized once per state (one float
        per block, 1/8 of the packed weight's bytes at blocksize 64) instead of on every forward."""
        if state.state2 is None:
            return state.absmax
        cached = self.__dict__.get("_absmax_cache")
        if cached is None or cached[0] is not state:
            n = math.prod(state.shape)
            cached = (state, F._absmax_4bit(state, n, self.weight.device, "weight"))
            self.__dict__["_absmax_cache"] = cached
        return cached[1]

    # --- state dict: bitsandbytes' keys ----------------------------------------------------------------

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quant_state is not None:
            for key, value in self.quant_state.as_dict(packed=True).items():
                if key in ("quant_map", "nested_quant_map"):
                    # The codebooks are shared (one cached tensor per device for every layer): a saved
                    # tensor must own its storage, or safetensors refuses the state dict ("share memory").
                    value = value.clone()
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        wkey = prefix + "weight"
        items = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        weight = state_dict.get(wkey)
        if isinstance(weight, torch.Tensor):
            problem = self._prepare_load(weight, items, wkey)
            if problem:
                error_msgs.append(problem)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        quant_keys = {f"{wkey}.{k}" for k in items}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in quant_keys]

    def _prepare_load(self, weight: torch.Tensor, items: dict[str, Any], wkey: str) -> Optional[str]:
        """Make self.weight (and quant_state) the shape the saved weight has; None, or what is wrong
        (a message that starts with the full key of the offending tensor)."""
        device = weight.device if self.weight.is_meta else self.weight.device
        if self.bias is not None and self.bias.is_meta:  # a layer built on "meta" is materialized here
            self.bias = nn.Parameter(torch.empty_like(self.bias, device=device), requires_grad=self.bias.requires_grad)
        if items:
            try:
                state = F.QuantState4bit.from_dict(items, device)
            except (TypeError, ValueError) as e:
                return f"{wkey}: {e}"
            if tuple(state.shape) != (self.out_features, self.in_features):
                return (f"{wkey}: the saved weight has shape {tuple(state.shape)}, this layer "
                        f"({self.out_features}, {self.in_features})")
            if weight.dtype != torch.uint8 or weight.numel() != (math.prod(state.shape) + 1) // 2:
                return (f"{wkey}: the saved 4-bit weight must hold {(math.prod(state.shape) + 1) // 2} uint8 bytes, "
                        f"got {weight.numel()} of {weight.dtype}")
            checked = _checked_loaded_state(state, wkey)
            if isinstance(checked, str):
                return checked
            self._warn_on_mismatch(checked, wkey)
            self.weight = nn.Parameter(torch.empty(weight.shape, dtype=torch.uint8, device=device),
                                       requires_grad=False)
            self.quant_state = checked
            self.quant_type, self.blocksize, self.compress_statistics = state.quant_type, state.blocksize, state.nested
            return None
        if weight.shape != (self.out_features, self.in_features) or weight.dtype not in F._DTYPES:
            return (f"{wkey}: expected a 4-bit weight with its quant state items, or a float weight of shape "
                    f"({self.out_features}, {self.in_features}); got {weight.dtype} of shape {tuple(weight.shape)}")
        # A float checkpoint (e.g. nn.Linear's): load it as the float weight; quantized on the next move,
        # or right away when this layer was already quantized. Lossy, so never silent.
        warnings.warn(KbitWarning(
            f"{wkey}: a float weight ({weight.dtype}) is loaded into a Linear4bit; it will be quantized "
            f"({self.quant_type}, blocksize {self.blocksize}) {'now' if self.quant_state is not None else 'on the next move or forward'}, "
            "which is lossy. Keep this layer a torch.nn.Linear (e.g. lm_head) to use the weight as saved; "
            "kbit.nn.load_4bit_checkpoint swaps only the layers a checkpoint holds quantized"), stacklevel=4)
        requantize = self.quant_state is not None
        self.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device=device), requires_grad=False)
        self.quant_state = None
        if requantize:
            self._register_load_state_dict_post_hook_once()
        return None

    def _warn_on_mismatch(self, state: F.QuantState4bit, wkey: str) -> None:
        """A KbitWarning naming the key and both values where this layer was built otherwise than the
        checkpoint it loads (the checkpoint wins: its codes mean nothing in another format)."""
        diffs = [f"{name} {mine!r} -> {theirs!r}" for name, mine, theirs in (
            ("quant_type", self.quant_type, state.quant_type), ("blocksize", self.blocksize, state.blocksize),
            ("compress_statistics", self.compress_statistics, state.nested)) if mine != theirs]
        if diffs:
            warnings.warn(KbitWarning(
                f"{wkey}: this Linear4bit was built with other settings than the checkpoint it loads; the "
                f"checkpoint's are used (this layer's -> the checkpoint's): {', '.join(diffs)}"), stacklevel=5)

    def _register_load_state_dict_post_hook_once(self) -> None:
        def hook(module: nn.Module, incompatible: Any) -> None:
            handle.remove()
            if isinstance(module, Linear4bit) and module.weight.device.type in ("cpu", "cuda"):
                module.quantize_()

        handle = self.register_load_state_dict_post_hook(hook)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"compress_statistics={self.compress_statistics}, quantized={self.is_quantized}")


# --- whole models ------------------------------------------------------------------------------------------

_log = logging.getLogger(__name__)
_QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` is one of `patterns` or lies inside one: equal to it, or equal after a
    dotted prefix ("model.layers.0.mlp" matches "mlp" and "layers.0.mlp"), or one of its children."""
    for p in patterns:
        if name == p or name.endswith("." + p) or name.startswith(p + ".") or f".{p}." in f".{name}.":
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linear_4bit(model: nn.Module, *, quant_type: str = "nf4", compute_dtype: Optional[torch.dtype] = None,
                        compress_statistics: bool = True, blocksize: int = 64,
                        skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Quantize `model`'s torch.nn.Linear layers in place: each becomes a Linear4bit (from_linear, on the
    layer's device) with these settings. Returns `model`.

    Layers named in `skip` stay float: a name matches a module whose dotted name is it, ends with it
    ("lm_head", "mlp.down_proj") or lies inside it ("model.layers.0"). The default keeps `lm_head`,
    as transformers does; a `skip` given replaces it (skip=() quantizes lm_head too, so list
    "lm_head" with your own names to keep it). Subclasses of nn.Linear are kept too (e.g. MultiheadAttention's out_proj,
    whose weight its parent reads directly). The names replaced are logged at DEBUG on "kbit.nn"."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError("model is itself a torch.nn.Linear: use kbit.nn.Linear4bit.from_linear(model) instead")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    F._check_quant_type(quant_type)
    F._check_blocksize_4bit(blocksize)
    _check_compute_dtype(compute_dtype)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not _matches(name, skip)]
    replaced = []
    for name, linear in targets:
        if linear.weight.is_meta:
            new = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                             compress_statistics, quant_type, blocksize, device="meta", dtype=linear.weight.dtype)
        else:
            new = Linear4bit.from_linear(linear, compute_dtype, compress_statistics, quant_type, blocksize)
        _set_submodule(model, name, new)
        replaced.append(name)
    _log.debug("replace_linear_4bit: quantized %d layers (%s, blocksize %d, compress_statistics=%s): %s; kept: %s",
               len(replaced), quant_type, blocksize, compress_statistics, replaced,
               [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    return model


def _read_checkpoint(source: Any) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], str]:
    """(state dict, config.json's content or None, a description) of a state dict, a .safetensors file
    or a save_pretrained folder."""
    if isinstance(source, Mapping):
        return dict(source), None, "the state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a state dict, a .safetensors file or a save_pretrained folder, "
                        f"got {type(source).__name__}")
    path = Path(source)
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors comes with transformers
        raise ImportError(f"reading {path} needs safetensors: pip install safetensors ({e})") from None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a save_pretrained folder")
        return load_file(str(path)), None, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    config = None
    if (path / "config.json").is_file():
        with open(path / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single)), config, str(path)
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no weight_map")
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {path}")
            sd.update(load_file(str(path / shard)))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"{index}: lists {missing[:5]} but its shards do not hold them")
        return sd, config, str(path)
    raise FileNotFoundError(f"{path}: holds neither model.safetensors nor model.safetensors.index.json")


def _config_compute_dtype(config: Optional[dict[str, Any]], where: str) -> Optional[torch.dtype]:
    """bnb_4bit_compute_dtype of config.json's quantization_config, or None when there is none."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{where}: the checkpoint is 8-bit (quantization_config.load_in_8bit); kbit loads 4-bit ones")
    name = qc.get("bnb_4bit_compute_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in F._DTYPES:
        raise ValueError(f"{where}: quantization_config.bnb_4bit_compute_dtype {name!r} is not float32, float16 "
                         "or bfloat16")
    return dtype  # type: ignore[return-value]


def load_4bit_checkpoint(model: nn.Module, source: Any, *, compute_dtype: Optional[torch.dtype] = None,
                         quant_type: Optional[str] = None, blocksize: Optional[int] = None,
                         compress_statistics: Optional[bool] = None) -> nn.Module:
    """Load a 4-bit checkpoint (bitsandbytes' / transformers' format, or kbit's) into `model`, a float
    model of the checkpoint's architecture, swapping in Linear4bit layers where the checkpoint holds
    quantized weights. Returns `model`.

    `source`: a state dict, a .safetensors file, or a save_pretrained folder (config.json with
    model.safetensors, or a sharded model.safetensors.index.json).

    - The quantized layers are those with a `<layer>.weight.quant_state.bitsandbytes__<nf4|fp4>` key;
      exactly those modules (torch.nn.Linear, or already Linear4bit) become Linear4bit, built on
      "meta" (no second allocation) and filled from the checkpoint. Every other layer, e.g. a float
      lm_head, stays as it is and loads the float weight as saved.
    - quant_type, blocksize and double quantization come from each layer's own saved state;
      compute_dtype from config.json's quantization_config.bnb_4bit_compute_dtype (what bitsandbytes
      computed in) when there is one, else the input's dtype. An argument given here that
      contradicts the checkpoint is a ValueError naming the key (change `layer.compute_dtype` after
      loading to compute otherwise on purpose).
    - The load is strict: a missing or unexpected key is a KbitLoadError naming it (keys of tied
      parameters, which the checkpoint saves once, excepted). A float16/bfloat16 absmax or
      nested_absmax is upcast exactly to float32; any other wrong dtype or shape of a state tensor
      is an error naming its key.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if quant_type is not None:
        F._check_quant_type(quant_type)
    if blocksize is not None:
        F._check_blocksize_4bit(blocksize)
    _check_compute_dtype(compute_dtype)
    sd, config, where = _read_checkpoint(source)
    config_dtype = _config_compute_dtype(config, where)
    if compute_dtype is not None and config_dtype is not None and compute_dtype != config_dtype:
        raise ValueError(f"compute_dtype={compute_dtype} contradicts the checkpoint's quantization_config."
                         f"bnb_4bit_compute_dtype ({config_dtype}) in {where}: leave it out, or set "
                         "layer.compute_dtype after loading")
    compute = config_dtype if config_dtype is not None else compute_dtype
    layers: dict[str, F.QuantState4bit] = {}
    for key in sd:
        if _QUANT_STATE_SUFFIX in key:
            name = key.split(_QUANT_STATE_SUFFIX, 1)[0]
            prefix = f"{name}.weight."
            try:
                layers[name] = F.QuantState4bit.from_dict(
                    {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, "cpu")
            except (TypeError, ValueError) as e:
                raise KbitLoadError(f"{name}.weight: {e}") from None
    orphans = sorted(k for k in sd if k.endswith(".weight.absmax") and k[: -len(".weight.absmax")] not in layers)
    if orphans:
        raise KbitLoadError(f"{orphans[0]}: a 4-bit state item without its "
                            f"'{orphans[0][: -len('absmax')]}quant_state.bitsandbytes__<nf4|fp4>' item")
    for name, state in layers.items():
        key = f"{name}.weight.quant_state.bitsandbytes__{state.quant_type}"
        for arg, given, saved in (("quant_type", quant_type, state.quant_type), ("blocksize", blocksize,
                                  state.blocksize), ("compress_statistics", compress_statistics, state.nested)):
            if given is not None and given != saved:
                raise ValueError(f"{arg}={given!r} contradicts the checkpoint: {key} says {saved!r}")
    # Layers already Linear4bit that the checkpoint holds as float weights would be quantized (lossy).
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and name not in layers and f"{name}.weight" in sd:
            raise KbitLoadError(f"{name}.weight: the checkpoint holds a float weight but the model's {name} is a "
                                "Linear4bit, which would quantize it (lossy): make it a torch.nn.Linear again")
    swapped = []
    for name, state in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KbitLoadError(f"{name}.weight: the checkpoint holds a 4-bit layer {name!r} that the model "
                                "does not have") from None
        if isinstance(module, Linear4bit):
            module.compute_dtype = compute if compute is not None else module.compute_dtype
            continue
        if not isinstance(module, nn.Linear):
            raise KbitLoadError(f"{name}.weight: the checkpoint holds this layer in 4 bits but the model's {name} is "
                                f"a {type(module).__name__}, not a torch.nn.Linear")
        bias_dtype = module.bias.dtype if module.bias is not None else torch.float32
        new = Linear4bit(module.in_features, module.out_features, module.bias is not None, compute,
                         state.nested, state.quant_type, state.blocksize, device="meta",
                         dtype=bias_dtype if bias_dtype in F._DTYPES else torch.float32)
        _set_submodule(model, name, new)
        swapped.append(name)
    result = model.load_state_dict(sd, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if not (tied.get(k, set()) & (set(sd) - set(result.missing_keys)))]
    if missing or result.unexpected_keys:
        parts = [f"missing from the checkpoint: {', '.join(missing)}"] if missing else []
        parts += [f"not in the model: {', '.join(result.unexpected_keys)}"] if result.unexpected_keys else []
        raise KbitLoadError(f"{where} does not fit the model; " + "; ".join(parts))
    _log.debug("load_4bit_checkpoint(%s): %d layers in 4 bits (swapped: %s), compute_dtype %s",
               where, len(layers), swapped, compute)
    return model


def _tied_keys(model: nn.Module) -> dict[str, set[str]]:
    """For every parameter key, the other keys of the same tensor (tied weights)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return {k: names - {k} for names in by_id.values() for k in names}


def quantization_config_4bit(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` transformers writes into config.json for a bitsandbytes 4-bit model,
    describing `model`'s Linear4bit layers (its float nn.Linear layers listed in
    llm_int8_skip_modules), so that transformers' from_pretrained loads what kbit saved."""
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not quantized:
        raise ValueError("model has no Linear4bit layer: there is no 4-bit quantization to describe")
    kinds = {(m.quant_type, m.compress_statistics, m.compute_dtype) for _, m in quantized}
    if len(kinds) > 1:
        raise ValueError(f"model's Linear4bit layers differ in (quant_type, compress_statistics, compute_dtype): "
                         f"{sorted(map(str, kinds))}; one quantization_config describes one setting")
    quant_type, nested, compute = kinds.pop()
    floats = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
            "bnb_4bit_compute_dtype": str(compute or torch.float32).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": floats or None,
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def save_4bit_checkpoint(model: nn.Module, folder: Union[str, os.PathLike], *, config: Any = None) -> Path:
    """Write `model` as a save_pretrained folder: model.safetensors (bitsandbytes' keys) and
    config.json: `config` (a dict, or an object with to_dict() such as a transformers config; default
    model.config when there is one) with quantization_config_4bit(model) set. Tied parameters are
    saved once, under their first key. Returns the folder."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - safetensors comes with transformers
        raise ImportError(f"save_4bit_checkpoint needs safetensors: pip install safetensors ({e})") from None
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit) and not m.is_quantized:
            m.quantize_()  # the float weight in 4 bits, as it would be at its first forward
            _log.debug("save_4bit_checkpoint: quantized %s before saving", name)
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        config_dict: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        config_dict = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        config_dict = dict(config.to_dict())
    else:
        raise TypeError(f"config must be a dict or have to_dict(), got {type(config).__name__}")
    config_dict["quantization_config"] = quantization_config_4bit(model)
    sd = model.state_dict()
    tied = _tied_keys(model)
    seen: set[str] = set()
    tensors = {}
    for key, value in sd.items():
        if tied.get(key, set()) & seen:
            continue
        seen.add(key)
        tensors[key] = value.detach().contiguous()
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    return path
