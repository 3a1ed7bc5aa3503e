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

import math
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
        for key in _OTHER_LAYOUTS:  # a TypeError from kbit, not the dispatcher's NotImplementedError
            _LIB.impl(name, _refuse_layout, key)
        if not differentiable:
            _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return impl

    return register


_OTHER_LAYOUTS = ("SparseCPU", "SparseCUDA", "SparseMeta", "SparseCsrCPU", "SparseCsrCUDA", "SparseCsrMeta",
                  "MkldnnCPU", "NestedTensorCPU", "NestedTensorCUDA", "NestedTensorMeta")


def _refuse_layout(*args: Any, **kwargs: Any) -> Any:
    for i, a in enumerate([*args, *kwargs.values()]):
        if isinstance(a, torch.Tensor) and (a.is_nested or a.layout != torch.strided):
            _check(a, f"tensor argument {i}", a.device, (a.dtype,))
    raise TypeError("kbit operators take dense (strided) tensors only")


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


def check_dense(t: torch.Tensor, name: str) -> None:
    """A dense (strided) tensor: kbit's functional API and its operators take no other layout."""
    if t.is_nested or t.layout != torch.strided:
        layout = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {layout} one: convert it with .to_dense()")


def _check(t: Any, name: str, device: torch.device, dtypes: Sequence[torch.dtype], numel: Optional[Any] = None) -> None:
    """What every tensor must be before native code gets its pointer: checked by the operator and by its
    fake implementation alike, before anything is allocated."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_dense(t, name)
    if t.dtype not in dtypes:
        names = [str(d) for d in dtypes]
        allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise TypeError(f"{name} must be {allowed}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other tensors on {device}: move them to one device")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous: call {name}.contiguous() first")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} elements, got {t.numel()}")


def _count(value: Any, name: str) -> Any:
    """A count (int or SymInt) >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _shape(shape: Any) -> tuple[Any, ...]:
    if not isinstance(shape, (list, tuple, torch.Size)):
        raise TypeError(f"shape must be a list of ints, got {type(shape).__name__}")
    return tuple(_count(d, "every shape dimension") for d in shape)


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
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if not low <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [{low}, 4096], got {blocksize}")
    return blocksize


def _blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize  # works on SymInts too


_F32 = (torch.float32,)
_U8 = (torch.uint8,)
_FLOATS = tuple(DTYPE_CODES)


# --- 8-bit blockwise ----------------------------------------------------------------------------------
# Each operator's _check_<name> runs first in the operator and in its fake implementation.


def _check_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    _blocksize(blocksize, 64)
    _check(A, "A", A.device if isinstance(A, torch.Tensor) else None, _FLOATS)
    _check(code, "code", A.device, _F32, 256)


@_define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize_blockwise(A, code, blocksize)
    dev = A.device
    out = torch.empty(A.shape, dtype=torch.uint8, device=dev)
    absmax = torch.empty(_blocks(A.numel(), blocksize), dtype=torch.float32, device=dev)
    args = (_float_dtype(A.dtype, "A"), A.data_ptr(), code.data_ptr(), out.data_ptr(), absmax.data_ptr(), A.numel(),
            blocksize)
    with _on_device(dev):
        _library(dev).quantize_blockwise_8bit(*args, _stream(dev))
    return out, absmax


@_fake("quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize_blockwise(A, code, blocksize)
    return (A.new_empty(A.shape, dtype=torch.uint8),
            A.new_empty(_blocks(A.numel(), blocksize), dtype=torch.float32))


def _check_dequantize_blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                                dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> None:
    _blocksize(blocksize, 64)
    _float_dtype(dtype, "out" if out is not None else "dtype")
    _check(codes, "codes", codes.device if isinstance(codes, torch.Tensor) else None, _U8)
    dev, n = codes.device, codes.numel()
    _check(code, "code", dev, _F32, 256)
    _check(absmax, "absmax", dev, _F32, _blocks(n, blocksize))
    if out is not None:
        _check(out, "out", dev, _FLOATS, n)


def _dequantize_blockwise_into(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                               out: torch.Tensor) -> None:
    dev, n = codes.device, codes.numel()
    args = (_float_dtype(out.dtype, "out"), codes.data_ptr(), code.data_ptr(), absmax.data_ptr(), out.data_ptr(),
            n, blocksize)
    with _on_device(dev):
        _library(dev).dequantize_blockwise_8bit(*args, _stream(dev))


@_define("dequantize_blockwise(Tensor codes, Tensor code, Tensor absmax, int blocksize, ScalarType dtype) "
         "-> Tensor")
def dequantize_blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize_blockwise(codes, code, absmax, blocksize, dtype)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    _dequantize_blockwise_into(codes, code, absmax, blocksize, out)
    return out


@_fake("dequantize_blockwise")
def _(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
      dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize_blockwise(codes, code, absmax, blocksize, dtype)
    return codes.new_empty(codes.shape, dtype=dtype)


@_define("dequantize_blockwise_out(Tensor codes, Tensor code, Tensor absmax, int blocksize, Tensor(a!) out) "
         "-> ()")
def dequantize_blockwise_out(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                             out: torch.Tensor) -> None:
    _check_dequantize_blockwise(codes, code, absmax, blocksize, _out_dtype(out), out)
    _dequantize_blockwise_into(codes, code, absmax, blocksize, out)


@_fake("dequantize_blockwise_out")
def _(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    _check_dequantize_blockwise(codes, code, absmax, blocksize, _out_dtype(out), out)


def _out_dtype(out: Any) -> torch.dtype:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    return out.dtype


# --- 4-bit NF4 / FP4 ----------------------------------------------------------------------------------


def _check_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    _blocksize(blocksize, 32)
    _quant_type(quant_type)
    _check(A, "A", A.device if isinstance(A, torch.Tensor) else None, _FLOATS)


@_define("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize_4bit(A, blocksize, quant_type)
    n, dev = A.numel(), A.device
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32, device=dev)
    args = (_float_dtype(A.dtype, "A"), _quant_type(quant_type), A.data_ptr(), packed.data_ptr(), absmax.data_ptr(),
            n, blocksize)
    with _on_device(dev):
        _library(dev).quantize_4bit(*args, _stream(dev))
    return packed, absmax


@_fake("quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize_4bit(A, blocksize, quant_type)
    n = A.numel()
    return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            A.new_empty(_blocks(n, blocksize), dtype=torch.float32))


def _check_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: Any,
                           dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> None:
    _blocksize(blocksize, 32)
    _quant_type(quant_type)
    _float_dtype(dtype, "out" if out is not None else "dtype")
    _check(packed, "packed", packed.device if isinstance(packed, torch.Tensor) else None, _U8, (n + 1) // 2)
    _check(absmax, "absmax", packed.device, _F32, _blocks(n, blocksize))
    if out is not None:
        _check(out, "out", packed.device, _FLOATS)


def _dequantize_4bit_into(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                          out: torch.Tensor) -> None:
    dev, n = packed.device, out.numel()
    args = (_float_dtype(out.dtype, "out"), _quant_type(quant_type), packed.data_ptr(), absmax.data_ptr(),
            out.data_ptr(), n, blocksize)
    with _on_device(dev):
        _library(dev).dequantize_4bit(*args, _stream(dev))


@_define("dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
         "ScalarType dtype) -> Tensor")
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    dims = _shape(shape)
    _check_dequantize_4bit(packed, absmax, blocksize, quant_type, math.prod(dims), dtype)
    out = torch.empty(dims, dtype=dtype, device=packed.device)
    _dequantize_4bit_into(packed, absmax, blocksize, quant_type, out)
    return out


@_fake("dequantize_4bit")
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
      dtype: torch.dtype) -> torch.Tensor:
    dims = _shape(shape)
    _check_dequantize_4bit(packed, absmax, blocksize, quant_type, math.prod(dims), dtype)
    return packed.new_empty(dims, dtype=dtype)


@_define("dequantize_4bit_out(Tensor packed, Tensor absmax, int blocksize, str quant_type, Tensor(a!) out) -> ()")
def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        out: torch.Tensor) -> None:
    _check_dequantize_4bit(packed, absmax, blocksize, quant_type, _out_numel(out), _out_dtype(out), out)
    _dequantize_4bit_into(packed, absmax, blocksize, quant_type, out)


@_fake("dequantize_4bit_out")
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor) -> None:
    _check_dequantize_4bit(packed, absmax, blocksize, quant_type, _out_numel(out), _out_dtype(out), out)


def _out_numel(out: Any) -> Any:
    return out.numel() if isinstance(out, torch.Tensor) else 0


def _check_gemv_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                     n_out: Any, k_in: Any, blocksize: int, quant_type: str) -> None:
    _check_matmul_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    if A.numel() != k_in:
        raise ValueError(f"A must hold {k_in} elements, got {A.numel()}")


@_define("gemv_4bit(Tensor A, Tensor packed, Tensor absmax, Tensor? bias, SymInt n_out, SymInt k_in, "
         "int blocksize, str quant_type) -> Tensor", differentiable=True)
def gemv_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
              n_out: int, k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    """out = W' A (+ bias) for one row A of k_in values and the (n_out, k_in) weight W quantized flat."""
    _check_gemv_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    return _linear_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type, rows=None)


def _linear_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                 n_out: int, k_in: int, blocksize: int, quant_type: str, rows: Optional[int]) -> torch.Tensor:
    """The checked call of kbit_gemv_4bit (rows None) or kbit_matmul_4bit (rows rows of A)."""
    dev = A.device
    out = torch.empty((*A.shape[:-1], n_out), dtype=A.dtype, device=dev)
    ptrs = (A.data_ptr(), packed.data_ptr(), absmax.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr())
    head = (_float_dtype(A.dtype, "A"), _quant_type(quant_type), *ptrs)
    with _on_device(dev):
        if rows is None:
            _library(dev).gemv_4bit(*head, n_out, k_in, blocksize, _stream(dev))
        else:
            _library(dev).matmul_4bit(*head, rows, n_out, k_in, blocksize, _stream(dev))
    return out


@_fake("gemv_4bit")
def _(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
      k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    _check_gemv_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    return A.new_empty((*A.shape[:-1], n_out))


def _gemv_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    A, packed, absmax, bias, n_out, k_in, blocksize, quant_type = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.shape, ctx.dtype, ctx.has_bias = A.shape, A.dtype, bias is not None
    ctx.n_out, ctx.k_in, ctx.blocksize, ctx.quant_type = n_out, k_in, blocksize, quant_type




def _check_matmul_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                       n_out: Any, k_in: Any, blocksize: int, quant_type: str) -> None:
    _count(n_out, "n_out")
    _count(k_in, "k_in")
    _blocksize(blocksize, 32)
    _quant_type(quant_type)
    _check(A, "A", A.device if isinstance(A, torch.Tensor) else None, _FLOATS)
    if A.dim() == 0 or A.shape[-1] != k_in:
        raise ValueError(f"A must have shape (..., {k_in}), got {tuple(A.shape)}")
    n = n_out * k_in
    _check(packed, "packed", A.device, _U8, (n + 1) // 2)
    _check(absmax, "absmax", A.device, _F32, _blocks(n, blocksize))
    if bias is not None:
        _check(bias, "bias", A.device, (A.dtype,), n_out)


@_define("matmul_4bit(Tensor A, Tensor packed, Tensor absmax, Tensor? bias, SymInt n_out, SymInt k_in, "
         "int blocksize, str quant_type) -> Tensor", differentiable=True)
def matmul_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                n_out: int, k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    """out = A W'^T (+ bias) for A of shape (..., k_in) and the (n_out, k_in) weight W quantized flat."""
    _check_matmul_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    return _linear_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type, rows=math.prod(A.shape[:-1]))


@_fake("matmul_4bit")
def _(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
      k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    _check_matmul_4bit(A, packed, absmax, bias, n_out, k_in, blocksize, quant_type)
    return A.new_empty((*A.shape[:-1], n_out))


def _linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """d out / d A = W' (the float32 dequantized weight), d out / d bias = 1; packed and absmax get none."""
    packed, absmax = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.ops.kbit.dequantize_4bit(packed, absmax, ctx.blocksize, ctx.quant_type, [ctx.n_out, ctx.k_in],
                                           torch.float32)
        grad_A = (grad.reshape(-1, ctx.n_out).float() @ W).reshape(ctx.shape).to(ctx.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, ctx.n_out).float().sum(0).to(ctx.dtype)
    return grad_A, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("kbit::matmul_4bit", _linear_backward, setup_context=_gemv_setup_context, lib=_LIB)
torch.library.register_autograd("kbit::gemv_4bit", _linear_backward, setup_context=_gemv_setup_context, lib=_LIB)


# --- the CPU's tiled 4-bit layout (kbit.h: kbit_repack_4bit_tiled) ---------------------------------------

TILED_GROUP = 64  # kbit.h's KBIT_TILED4_GROUP: output columns per group


def tiled_sizes(n_out: Any, k_in: Any, blocksize: int) -> tuple[Any, Any]:
    """Bytes of the tiled codes and floats of its scales for an (n_out, k_in) weight."""
    groups = (n_out + TILED_GROUP - 1) // TILED_GROUP
    return groups * 32 * k_in, groups * TILED_GROUP * (k_in // blocksize)


def _check_tiled_shape(n_out: Any, k_in: Any, blocksize: int) -> None:
    _count(n_out, "n_out")
    _count(k_in, "k_in")
    _blocksize(blocksize, 32)
    if k_in % blocksize:
        raise ValueError(f"the tiled layout needs k_in to be a multiple of blocksize, got k_in {k_in} and "
                         f"blocksize {blocksize}")


def _cpu_only(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"the tiled 4-bit layout is the CPU's: {name} is on {t.device}; on CUDA use "
                         "kbit::matmul_4bit with the packed weight")


def _check_repack_4bit_tiled(packed: torch.Tensor, absmax: torch.Tensor, n_out: Any, k_in: Any,
                             blocksize: int) -> None:
    _check_tiled_shape(n_out, k_in, blocksize)
    _check(packed, "packed", packed.device if isinstance(packed, torch.Tensor) else None, _U8,
           (n_out * k_in + 1) // 2)
    _cpu_only(packed, "packed")
    _check(absmax, "absmax", packed.device, _F32, _blocks(n_out * k_in, blocksize))


@_define("repack_4bit_tiled(Tensor packed, Tensor absmax, SymInt n_out, SymInt k_in, int blocksize) "
         "-> (Tensor, Tensor)")
def repack_4bit_tiled(packed: torch.Tensor, absmax: torch.Tensor, n_out: int, k_in: int,
                      blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled layout (codes, scales) of an (n_out, k_in) weight quantized flat with a float32 absmax."""
    _check_repack_4bit_tiled(packed, absmax, n_out, k_in, blocksize)
    nbytes, nscales = tiled_sizes(n_out, k_in, blocksize)
    tiled = torch.empty(nbytes, dtype=torch.uint8)
    scales = torch.empty(nscales, dtype=torch.float32)
    _library(packed.device).repack_4bit_tiled(packed.data_ptr(), absmax.data_ptr(), tiled.data_ptr(),
                                            scales.data_ptr(), n_out, k_in, blocksize)
    return tiled, scales


@_fake("repack_4bit_tiled")
def _(packed: torch.Tensor, absmax: torch.Tensor, n_out: int, k_in: int,
      blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_repack_4bit_tiled(packed, absmax, n_out, k_in, blocksize)
    nbytes, nscales = tiled_sizes(n_out, k_in, blocksize)
    return packed.new_empty(nbytes), absmax.new_empty(nscales)


def _check_matmul_4bit_tiled(A: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor,
                             bias: Optional[torch.Tensor], n_out: Any, k_in: Any, blocksize: int,
                             quant_type: str) -> None:
    _check_tiled_shape(n_out, k_in, blocksize)
    _quant_type(quant_type)
    _check(A, "A", A.device if isinstance(A, torch.Tensor) else None, _FLOATS)
    _cpu_only(A, "A")
    if A.dim() == 0 or A.shape[-1] != k_in:
        raise ValueError(f"A must have shape (..., {k_in}), got {tuple(A.shape)}")
    nbytes, nscales = tiled_sizes(n_out, k_in, blocksize)
    _check(tiled, "tiled", A.device, _U8, nbytes)
    _check(scales, "scales", A.device, _F32, nscales)
    if bias is not None:
        _check(bias, "bias", A.device, (A.dtype,), n_out)


@_define("matmul_4bit_tiled(Tensor A, Tensor tiled, Tensor scales, Tensor? bias, SymInt n_out, SymInt k_in, "
         "int blocksize, str quant_type) -> Tensor")
def matmul_4bit_tiled(A: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                      n_out: int, k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    """out = A W'^T (+ bias) with W in the CPU's tiled layout (not differentiable: Linear4bit uses it
    when no gradient is wanted)."""
    _check_matmul_4bit_tiled(A, tiled, scales, bias, n_out, k_in, blocksize, quant_type)
    out = torch.empty((*A.shape[:-1], n_out), dtype=A.dtype)
    _library(A.device).matmul_4bit_tiled(_float_dtype(A.dtype, "A"), _quant_type(quant_type), A.data_ptr(),
                                            tiled.data_ptr(), scales.data_ptr(),
                                            None if bias is None else bias.data_ptr(), out.data_ptr(),
                                            math.prod(A.shape[:-1]), n_out, k_in, blocksize, None)
    return out


def matmul_4bit_tiled_own(A: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                          n_out: int, k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    """matmul_4bit_tiled for a layer's own tiled copy (made by repack_4bit_tiled for exactly this shape),
    in eager mode without a gradient: the dispatcher and the copy's checks are skipped (about 10 us of
    a 0.2 ms call); A and bias, which come from the caller, are still checked before native code."""
    if (A.layout != torch.strided or A.device.type != "cpu" or A.dtype not in DTYPE_CODES or not A.is_contiguous()
            or A.dim() == 0 or A.shape[-1] != k_in):
        return matmul_4bit_tiled(A, tiled, scales, bias, n_out, k_in, blocksize, quant_type)  # its error
    if bias is not None and (bias.layout != torch.strided or bias.device.type != "cpu" or bias.dtype != A.dtype
                             or bias.numel() != n_out or not bias.is_contiguous()):
        return matmul_4bit_tiled(A, tiled, scales, bias, n_out, k_in, blocksize, quant_type)
    out = torch.empty((*A.shape[:-1], n_out), dtype=A.dtype)
    _library(A.device).matmul_4bit_tiled(DTYPE_CODES[A.dtype], QUANT_TYPES_4BIT.index(quant_type), A.data_ptr(),
                                         tiled.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
                                         out.data_ptr(), math.prod(A.shape[:-1]), n_out, k_in, blocksize, None)
    return out


@_fake("matmul_4bit_tiled")
def _(A: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
      k_in: int, blocksize: int, quant_type: str) -> torch.Tensor:
    _check_matmul_4bit_tiled(A, tiled, scales, bias, n_out, k_in, blocksize, quant_type)
    return A.new_empty((*A.shape[:-1], n_out))


# --- 8-bit Adam ---------------------------------------------------------------------------------------


def _check_adam(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, absmax1: torch.Tensor,
                absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step < 2**31:
        raise ValueError(f"step must be in [1, 2**31), got {step}")
    _check(p, "p", p.device if isinstance(p, torch.Tensor) else None, _FLOATS)
    dev, n = p.device, p.numel()
    blocks = _blocks(n, OPTIM8_BLOCKSIZE)
    _check(g, "g", dev, (p.dtype,), n)
    for t, name in ((state1, "state1"), (state2, "state2")):
        _check(t, name, dev, _U8, n)
    for t, name in ((absmax1, "absmax1"), (absmax2, "absmax2")):
        _check(t, name, dev, _F32, blocks)
    for t, name in ((qmap1, "qmap1"), (qmap2, "qmap2")):
        _check(t, name, dev, _F32, 256)


@_define("adam_8bit_blockwise(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
         "Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, float beta1, float beta2, float eps, "
         "float weight_decay, float lr, int step, float gnorm_scale, bool decoupled) -> ()")
def adam_8bit_blockwise(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                        absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float, lr: float, step: int,
                        gnorm_scale: float, decoupled: bool) -> None:
    """One in-place 8-bit blockwise Adam (decoupled=False) or AdamW (True) step of kbit.h's
    kbit_adam_8bit_blockwise; `step` >= 1 counts this step."""
    _check_adam(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step)
    dev = p.device
    ptrs = tuple(t.data_ptr() for t in (p, g, state1, state2, absmax1, absmax2, qmap1, qmap2))
    with _on_device(dev):
        _library(dev).adam_8bit_blockwise(_float_dtype(p.dtype, "p"), *ptrs, beta1, beta2, eps, weight_decay, lr,
                                          step, gnorm_scale, decoupled, p.numel(), _stream(dev))


@_fake("adam_8bit_blockwise")
def _(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, absmax1: torch.Tensor,
      absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, beta1: float, beta2: float, eps: float,
      weight_decay: float, lr: float, step: int, gnorm_scale: float, decoupled: bool) -> None:
    _check_adam(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step)
