"""kbit's torch.library operators (namespace `kbit`): the one place that calls the native libraries.

Importing this module registers the operators (it is imported by kbit.functional, kbit.nn and
kbit.optim, never by `import kbit`). Each operator has one implementation for CPU and CUDA tensors,
which calls the library the runtime chose for the tensors' device, and a fake implementation (shapes
and dtypes only), so `torch.compile` traces through them.

Layering: kbit.functional checks every argument (with the names users see) and calls these operators;
the operators check again, briefly, that what reaches native code is safe (dtype, device, contiguity,
sizes), since they can also be called directly as `torch.ops.kbit.<name>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch

from . import _native
from ._errors import KbitNoBackendError

__all__ = ["DTYPE_CODES", "OPTIM8_BLOCKSIZE", "QUANT_TYPES_4BIT"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""kbit.h's KBIT_DTYPE_* of each supported floating point dtype."""
QUANT_TYPES_4BIT = ("fp4", "nf4")
"""The 4-bit quantization types; kbit.h's KBIT_QUANT_FP4 and KBIT_QUANT_NF4 are their indices."""
OPTIM8_BLOCKSIZE = 256
"""kbit.h's KBIT_OPTIM8_BLOCKSIZE: one absmax per 256 values of each 8-bit optimizer state."""
_LIB = torch.library.Library("kbit", "DEF")  # the kbit namespace: defined once per process, kept for its lifetime
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _define(schema: str, differentiable: bool = False) -> Callable[[_Fn], _Fn]:
    """Define the operator kbit::<schema> with the decorated function as its CPU and CUDA kernel.
    A non-differentiable operator's outputs never require grad (an Autograd fallthrough); a
    differentiable one registers its backward with torch.library.register_autograd.

    (torch.library.Library.define + impl rather than torch.library.custom_op: the same operator to
    torch.compile and opcheck, at a fraction of custom_op's eager dispatch cost: ~10 vs ~35 us a call.)"""

    def register(impl: _Fn) -> _Fn:
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, impl, key)
        if not differentiable:
            _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return impl

    return register


def _fake(name: str) -> Callable[[_Fn], _Fn]:
    """Register the decorated function as kbit::<name>'s fake (shape and dtype only) implementation."""

    def register(fn: _Fn) -> _Fn:
        torch.library.register_fake(f"kbit::{name}", fn, lib=_LIB)
        return fn

    return register


# --- calling native code ------------------------------------------------------------------------------


def _library(device: torch.device) -> _native.NativeLibrary:
    """The native library for tensors on `device` (tests replace it to prove a call never gets here)."""
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


def _guard(t: torch.Tensor, name: str, device: torch.device, dtypes: Sequence[torch.dtype],
           numel: Optional[int] = None) -> int:
    """The last line of defence before a pointer goes to native code; returns t.data_ptr()."""
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other tensors on {device}: move them to one device")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous: call {name}.contiguous() first")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} elements, got {t.numel()}")
    return t.data_ptr()


def _float_dtype(dtype: torch.dtype, name: str) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return DTYPE_CODES[dtype]


def _quant_type(quant_type: str) -> int:
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return QUANT_TYPES_4BIT.index(quant_type)


def _blocksize(blocksize: int, low: int) -> int:
    """A power of two in [low, 4096] (kbit.h's KBIT_BLOCKWISE{8,4}_{MIN,MAX}_BLOCKSIZE)."""
    if not low <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [{low}, 4096], got {blocksize}")
    return blocksize


def _blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize  # works on SymInts too


_F32 = (torch.float32,)
_U8 = (torch.uint8,)
_FLOATS = tuple(DTYPE_CODES)


# --- 8-bit blockwise ----------------------------------------------------------------------------------


@_define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_blocks(A.numel(), _blocksize(blocksize, 64)), dtype=torch.float32, device=A.device)
    dev = A.device
    args = (_float_dtype(A.dtype, "A"), _guard(A, "A", dev, _FLOATS), _guard(code, "code", dev, _F32, 256),
            out.data_ptr(), absmax.data_ptr(), A.numel(), blocksize)
    with _on_device(dev):
        _library(dev).quantize_blockwise_8bit(*args, _stream(dev))
    return out, absmax


@_fake("quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (A.new_empty(A.shape, dtype=torch.uint8),
            A.new_empty(_blocks(A.numel(), blocksize), dtype=torch.float32))


def _dequantize_blockwise_into(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                               out: torch.Tensor) -> None:
    dev, n = codes.device, codes.numel()
    _blocksize(blocksize, 64)
    args = (_float_dtype(out.dtype, "out"), _guard(codes, "codes", dev, _U8), _guard(code, "code", dev, _F32, 256),
            _guard(absmax, "absmax", dev, _F32, _blocks(n, blocksize)), _guard(out, "out", dev, _FLOATS, n),
            n, blocksize)
    with _on_device(dev):
        _library(dev).dequantize_blockwise_8bit(*args, _stream(dev))


@_define("dequantize_blockwise(Tensor codes, Tensor code, Tensor absmax, int blocksize, ScalarType dtype) "
         "-> Tensor")
def dequantize_blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    _dequantize_blockwise_into(codes, code, absmax, blocksize, out)
    return out


@_fake("dequantize_blockwise")
def _(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
      dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(codes.shape, dtype=dtype)


@_define("dequantize_blockwise_out(Tensor codes, Tensor code, Tensor absmax, int blocksize, Tensor(a!) out) "
         "-> ()")
def dequantize_blockwise_out(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                             out: torch.Tensor) -> None:
    _dequantize_blockwise_into(codes, code, absmax, blocksize, out)


@_fake("dequantize_blockwise_out")
def _(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    return None


# --- 4-bit NF4 / FP4 ----------------------------------------------------------------------------------


@_define("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, dev = A.numel(), A.device
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(_blocks(n, _blocksize(blocksize, 32)), dtype=torch.float32, device=dev)
    args = (_float_dtype(A.dtype, "A"), _quant_type(quant_type), _guard(A, "A", dev, _FLOATS), packed.data_ptr(),
            absmax.data_ptr(), n, blocksize)
    with _on_device(dev):
        _library(dev).quantize_4bit(*args, _stream(dev))
    return packed, absmax


@_fake("quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            A.new_empty(_blocks(n, blocksize), dtype=torch.float32))


def _dequantize_4bit_into(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                          out: torch.Tensor) -> None:
    dev, n = packed.device, out.numel()
    _blocksize(blocksize, 32)
    args = (_float_dtype(out.dtype, "out"), _quant_type(quant_type),
            _guard(packed, "packed", dev, _U8, (n + 1) // 2), _guard(absmax, "absmax", dev, _F32, _blocks(n, blocksize)),
            _guard(out, "out", dev, _FLOATS), n, blocksize)
    with _on_device(dev):
        _library(dev).dequantize_4bit(*args, _stream(dev))


@_define("dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
         "ScalarType dtype) -> Tensor")
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    _dequantize_4bit_into(packed, absmax, blocksize, quant_type, out)
    return out


@_fake("dequantize_4bit")
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
      dtype: torch.dtype) -> torch.Tensor:
    return packed.new_empty(tuple(shape), dtype=dtype)


@_define("dequantize_4bit_out(Tensor packed, Tensor absmax, int blocksize, str quant_type, Tensor(a!) out) -> ()")
def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        out: torch.Tensor) -> None:
    _dequantize_4bit_into(packed, absmax, blocksize, quant_type, out)


@_fake("dequantize_4bit_out")
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor) -> None:
    return None


@_define("gemv_4bit(Tensor A, Tensor packed, Tensor absmax, Tensor? bias, SymInt n_out, SymInt k_in, "
         "int blocksize, str quant_type) -> Tensor", differentiable=True)
def gemv_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
              n_out: int, k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    """out = W' A (+ bias) for one row A of k_in values and the (n_out, k_in) weight W quantized flat."""
    dev, n = A.device, n_out * k_in
    _blocksize(blocksize, 32)
    out = torch.empty((*A.shape[:-1], n_out), dtype=A.dtype, device=dev)
    bias_ptr = None if bias is None else _guard(bias, "bias", dev, (A.dtype,), n_out)
    args = (_float_dtype(A.dtype, "A"), _quant_type(quant_type), _guard(A, "A", dev, _FLOATS, k_in),
            _guard(packed, "packed", dev, _U8, (n + 1) // 2), _guard(absmax, "absmax", dev, _F32, _blocks(n, blocksize)),
            bias_ptr, out.data_ptr(), n_out, k_in, blocksize)
    with _on_device(dev):
        _library(dev).gemv_4bit(*args, _stream(dev))
    return out


@_fake("gemv_4bit")
def _(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
      k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    return A.new_empty((*A.shape[:-1], n_out))


def _gemv_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    A, packed, absmax, bias, n_out, k_in, blocksize, quant_type = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.shape, ctx.dtype, ctx.has_bias = A.shape, A.dtype, bias is not None
    ctx.n_out, ctx.k_in, ctx.blocksize, ctx.quant_type = n_out, k_in, blocksize, quant_type


def _gemv_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """d out / d A = W' (the float32 dequantized weight), d out / d bias = 1; packed and absmax get none."""
    packed, absmax = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.ops.kbit.dequantize_4bit(packed, absmax, ctx.blocksize, ctx.quant_type, [ctx.n_out, ctx.k_in],
                                           torch.float32)
        grad_A = (grad.reshape(1, ctx.n_out).float() @ W).reshape(ctx.shape).to(ctx.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(ctx.n_out)
    return grad_A, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("kbit::gemv_4bit", _gemv_backward, setup_context=_gemv_setup_context, lib=_LIB)


# --- 8-bit Adam ---------------------------------------------------------------------------------------


@_define("adam_8bit_blockwise(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
         "Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, float beta1, float beta2, float eps, "
         "float weight_decay, float lr, int step, float gnorm_scale, bool decoupled) -> ()")
def adam_8bit_blockwise(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                        absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float, lr: float, step: int,
                        gnorm_scale: float, decoupled: bool) -> None:
    """One in-place 8-bit blockwise Adam (decoupled=False) or AdamW (True) step of kbit.h's
    kbit_adam_8bit_blockwise; `step` >= 1 counts this step."""
    dev, n = p.device, p.numel()
    if not 1 <= step < 2**31:
        raise ValueError(f"step must be in [1, 2**31), got {step}")
    blocks = _blocks(n, OPTIM8_BLOCKSIZE)
    ptrs = (_guard(p, "p", dev, _FLOATS), _guard(g, "g", dev, (p.dtype,), n), _guard(state1, "state1", dev, _U8, n),
            _guard(state2, "state2", dev, _U8, n), _guard(absmax1, "absmax1", dev, _F32, blocks),
            _guard(absmax2, "absmax2", dev, _F32, blocks), _guard(qmap1, "qmap1", dev, _F32, 256),
            _guard(qmap2, "qmap2", dev, _F32, 256))
    with _on_device(dev):
        _library(dev).adam_8bit_blockwise(_float_dtype(p.dtype, "p"), *ptrs, beta1, beta2, eps, weight_decay, lr,
                                          step, gnorm_scale, decoupled, n, _stream(dev))


@_fake("adam_8bit_blockwise")
def _(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, absmax1: torch.Tensor,
      absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, beta1: float, beta2: float, eps: float,
      weight_decay: float, lr: float, step: int, gnorm_scale: float, decoupled: bool) -> None:
    return None
