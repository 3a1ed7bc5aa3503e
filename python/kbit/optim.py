"""8-bit Adam and AdamW: drop-in torch.optim optimizers whose two moments take one byte per value.

For a parameter of at least `min_8bit_size` elements (a param-group setting; float32, float16 or
bfloat16, on CPU or CUDA), the first moment is stored as uint8 codes of the signed dynamic map and
the second as codes of the unsigned one, each with one float32 absmax per 256 values (bitsandbytes'
blockwise 8-bit optimizer layout); one native kernel (kbit.h: kbit_adam_8bit_blockwise, torch op
kbit::adam_8bit_blockwise) updates moments and parameter in place. Smaller parameters keep float32 moments and take a plain
Adam step in torch. State: "step" (int) and "state1", "state2", "absmax1", "absmax2" (8-bit) or
"exp_avg", "exp_avg_sq" (float32); state_dict() / load_state_dict() keep these dtypes.

NaN/inf: a non-finite gradient makes the moments of its 256-value block and those parameters
non-finite, as torch.optim.Adam would; skip such steps yourself (e.g. with a GradScaler) if needed.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch

from . import _ops
from . import functional as F

__all__ = ["Adam8bit", "AdamW8bit"]


_FLT_MAX = 3.4028234663852886e38


def _f32(x: float) -> float:
    """x rounded to float32, as the kernel receives it (inf when out of float32's range)."""
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, min_8bit_size: Any) -> None:
    """Each value as the kernel checks it, in float32 (e.g. a beta that rounds to 1.0 is refused)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (_number(value) and math.isfinite(_f32(value)) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0 that is finite in float32, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_number(b) and 0.0 <= b and _f32(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1) (below 1 in float32), got {betas!r}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
        raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")


_MAX_STEP = 2**31 - 1  # the kernel's step is an int32


def _check_step(group: dict[str, Any], step: int, decoupled: bool) -> None:
    """The group's settings (a scheduler, or a user, may have changed them since construction), the
    step count (as loaded from a state dict, too) and the step's float32 constants, lr / (1 - beta1^step)
    and AdamW's 1 - lr * weight_decay, which the kernel refuses when they overflow. Both paths, 8-bit
    and float32, step only with values that pass."""
    _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["min_8bit_size"])
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= _MAX_STEP:
        raise ValueError(f"the step count must be an int in [1, 2**31), got {step!r} (a loaded state dict's "
                         "'step' is counted on from)")
    lr, wd, beta1 = _f32(group["lr"]), _f32(group["weight_decay"]), _f32(group["betas"][0])
    step_size = lr / (1.0 - beta1**step)
    decay = 1.0 - lr * wd if decoupled else 1.0
    if abs(step_size) > _FLT_MAX or abs(decay) > _FLT_MAX:
        raise ValueError(f"lr={group['lr']!r} with weight_decay={group['weight_decay']!r} and betas={group['betas']!r} "
                         "overflow float32 in this step's constants: use a smaller lr or weight_decay")


class _Adam8bitBase(torch.optim.Optimizer):
    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, min_8bit_size: int = 4096) -> None:
        _check_hyper(lr, betas, eps, weight_decay, min_8bit_size)
        # min_8bit_size is a group setting, so that it travels with state_dict() and pickling.
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "min_8bit_size": min_8bit_size})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, refusing parameters Adam's real-valued arithmetic cannot step
        (complex or integer tensors) with a TypeError, before any state exists."""
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a generator is read once: keep what it gave
            params = list(params)
            param_group = {**param_group, "params": params}
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise TypeError(f"{type(self).__name__} steps real floating-point parameters; got one of dtype "
                                f"{p.dtype} (complex parameters: view them as real with torch.view_as_real)")
        super().add_param_group(param_group)

    @staticmethod
    def _uses_8bit(p: torch.Tensor, group: dict[str, Any]) -> bool:
        return (p.numel() >= group["min_8bit_size"] and p.dtype in _ops.DTYPE_CODES
                and p.device.type in ("cpu", "cuda"))

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        if self._uses_8bit(p, group):
            blocks = (p.numel() + _ops.OPTIM8_BLOCKSIZE - 1) // _ops.OPTIM8_BLOCKSIZE
            for name in ("state1", "state2"):
                state[name] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            for name in ("absmax1", "absmax2"):
                state[name] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            dtype = torch.promote_types(p.dtype, torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step; `closure` (re-evaluating the model and returning the loss) is
        called with gradients enabled, and its result returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients (got a "
                                    f"{str(p.grad.layout).removeprefix('torch.')} one)")
                if p.grad.is_complex() or not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__} steps real floating-point parameters; got a {p.dtype} "
                                    f"parameter with a {p.grad.dtype} gradient")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                step = state["step"]
                step = step + 1 if isinstance(step, int) and not isinstance(step, bool) else step
                _check_step(group, step, self._decoupled)
                state["step"] = step
                if "state1" in state:
                    self._step_8bit(p, state, group)
                else:
                    self._step_torch(p, state, group)
        return loss

    def _step_8bit(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        work = p.detach() if p.is_contiguous() else p.detach().contiguous()
        grad = p.grad.detach().to(p.dtype).contiguous()  # type: ignore[union-attr]
        torch.ops.kbit.adam_8bit_blockwise(
            work, grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"],
            F.dynamic_map(True, p.device), F.dynamic_map(False, p.device), float(beta1), float(beta2),
            float(group["eps"]), float(group["weight_decay"]), float(group["lr"]), int(state["step"]), 1.0,
            self._decoupled)
        if work.data_ptr() != p.data_ptr():
            p.copy_(work)

    def _step_torch(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """torch.optim.Adam(W)'s step, in its order: sqrt(v) / sqrt(1 - beta2^step), never v / (1 -
        beta2^step) first, which overflows for gradients torch's Adam survives."""
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd, eps, step = float(group["lr"]), float(group["weight_decay"]), float(group["eps"]), state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        param = p.detach().to(m.dtype)  # p itself when it is float32
        grad = p.grad.detach().to(m.dtype)  # type: ignore[union-attr]
        if wd and self._decoupled:
            param.mul_(1.0 - lr * wd)
        elif wd:
            grad = grad + wd * param
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
        param.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
        if param.data_ptr() != p.data_ptr():
            p.copy_(param)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, except that each state tensor keeps its saved dtype (torch would
        cast the uint8 codes and float32 moments to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)


class Adam8bit(_Adam8bitBase):
    """Adam (L2 weight decay added to the gradient) with 8-bit blockwise moments; see the module doc.

    Arguments as torch.optim.Adam: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
    plus min_8bit_size=4096 (smaller tensors keep float32 moments)."""

    _decoupled = False


class AdamW8bit(_Adam8bitBase):
    """AdamW (decoupled weight decay: p *= 1 - lr * weight_decay) with 8-bit blockwise moments.

    Arguments as torch.optim.AdamW: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=1e-2, plus min_8bit_size=4096."""

    _decoupled = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size)
