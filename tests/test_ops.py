"""The torch.library operators (namespace kbit): torch.library.opcheck on each, torch.compile of
quantize_4bit + dequantize_4bit + gemv_4bit equal to eager, and `import kbit` still without torch."""

from __future__ import annotations

import pytest
import torch
from kbit import functional as F

OPS = ["quantize_blockwise", "dequantize_blockwise", "dequantize_blockwise_out", "quantize_4bit", "dequantize_4bit",
       "dequantize_4bit_out", "gemv_4bit", "matmul_4bit", "repack_4bit_tiled", "matmul_4bit_tiled",
       "adam_8bit_blockwise"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _adam_args(dtype: torch.dtype) -> tuple:
    n = 1000
    p = torch.randn(n, generator=_gen(1)).to(dtype)
    g = torch.randn(n, generator=_gen(2)).to(dtype)
    blocks = (n + 255) // 256
    states = (torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks),
              torch.zeros(blocks))
    maps = (F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False))
    return (p, g, *states, *maps, 0.9, 0.999, 1e-8, 0.01, 1e-3, 1, 1.0, True)


def op_samples() -> list[tuple[str, tuple]]:
    A = torch.randn(37, 33, generator=_gen(0))
    code = F.create_dynamic_map()
    codes, st8 = F.quantize_blockwise(A, blocksize=64)
    packed, st4 = F.quantize_4bit(A, blocksize=64, quant_type="fp4")
    x, bias = torch.randn(1, 33, generator=_gen(3)), torch.randn(37, generator=_gen(4))
    # the tiled layout needs k_in % blocksize == 0: a 37 x 64 weight
    packed64, st64 = F.quantize_4bit(torch.randn(37, 64, generator=_gen(5)), blocksize=32, quant_type="nf4")
    tiled, scales = torch.ops.kbit.repack_4bit_tiled(packed64, st64.absmax, 37, 64, 32)
    x64 = torch.randn(3, 64, generator=_gen(6))
    samples = [("repack_4bit_tiled", (packed64, st64.absmax, 37, 64, 32))]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        Ad = A.to(dtype)
        samples += [
            ("quantize_blockwise", (Ad, code, 64)),
            ("dequantize_blockwise", (codes, code, st8.absmax, 64, dtype)),
            ("dequantize_blockwise_out", (codes, code, st8.absmax, 64, torch.empty(37, 33, dtype=dtype))),
            ("quantize_4bit", (Ad, 32, "nf4")),
            ("dequantize_4bit", (packed, st4.absmax, 64, "fp4", [37, 33], dtype)),
            ("dequantize_4bit_out", (packed, st4.absmax, 64, "fp4", torch.empty(37, 33, dtype=dtype))),
            ("gemv_4bit", (x.to(dtype), packed, st4.absmax, bias.to(dtype), 37, 33, 64, "fp4")),
            ("gemv_4bit", (x.to(dtype).reshape(33), packed, st4.absmax, None, 37, 33, 64, "fp4")),
            ("gemv_4bit", (x.to(dtype).requires_grad_(), packed, st4.absmax, bias.to(dtype).requires_grad_(), 37, 33,
                           64, "fp4")),
            ("matmul_4bit", (x64.to(dtype), packed64, st64.absmax, bias.to(dtype), 37, 64, 32, "nf4")),
            ("matmul_4bit_tiled", (x64.to(dtype), tiled, scales, bias.to(dtype), 37, 64, 32, "nf4")),
            ("matmul_4bit_tiled", (x64.to(dtype).reshape(1, 3, 64), tiled, scales, None, 37, 64, 32, "nf4")),
            ("adam_8bit_blockwise", _adam_args(dtype)),
        ]
    return samples


@pytest.mark.parametrize("name,args", op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name: str, args: tuple) -> None:
    torch.library.opcheck(getattr(torch.ops.kbit, name).default, args)


def test_every_op_is_registered() -> None:
    for name in OPS:
        assert isinstance(getattr(torch.ops.kbit, name), torch._ops.OpOverloadPacket)


def test_gemv_gradients() -> None:
    """kbit::gemv_4bit is differentiable in A and bias, as linear with the float32 dequantized weight."""
    W = torch.randn(37, 33, generator=_gen(8))
    packed, state = F.quantize_4bit(W, blocksize=32)
    W32 = F.dequantize_4bit(packed, state)
    x, bias = torch.randn(1, 33, generator=_gen(9), requires_grad=True), torch.randn(37, requires_grad=True)
    grad_out = torch.randn(1, 37, generator=_gen(10))
    F.gemv_4bit(x, packed, state, bias).backward(grad_out)
    x2, bias2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, W32, bias2).backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, bias2.grad)


def test_quantization_is_not_differentiable() -> None:
    A = torch.randn(100, requires_grad=True)
    packed, state = F.quantize_4bit(A, compress_statistics=True)
    assert not state.absmax.requires_grad and not state.state2.absmax.requires_grad
    assert not F.dequantize_4bit(packed, state).requires_grad
    codes, state8 = F.quantize_blockwise(A, blocksize=64)
    assert not state8.absmax.requires_grad and not F.dequantize_blockwise(codes, state8).requires_grad


def test_import_kbit_does_not_import_torch(run_python) -> None:
    code = ("import sys, kbit; assert 'torch' not in sys.modules, 'import kbit imported torch'; "
            "import kbit.functional; assert hasattr(sys.modules['torch'].ops.kbit, 'gemv_4bit')")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr


def quantized_pipeline(W: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    W2 = F.dequantize_4bit(packed, state)
    y = F.gemv_4bit(x, packed, state, bias)
    return packed, W2, y, y * 2 + 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_equals_eager(backend: str) -> None:
    torch._dynamo.reset()
    W = torch.randn(96, 160, generator=_gen(5)) * 0.1
    x, bias = torch.randn(1, 160, generator=_gen(6)), torch.randn(96, generator=_gen(7))
    eager = quantized_pipeline(W, x, bias)
    compiled = torch.compile(quantized_pipeline, backend=backend, fullgraph=True)(W, x, bias)
    for e, c in zip(eager, compiled):
        assert e.dtype == c.dtype and e.shape == c.shape
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
    assert torch.equal(eager[0], compiled[0])  # the codes themselves are bit-equal
