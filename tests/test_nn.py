"""kbit.nn.Linear4bit: quantization on construction / move, the GEMV and dequantize paths, state dict
round trips, and checkpoints of bitsandbytes 0.50.2's Linear4bit (the same keys and bytes; the outputs
against the reference dequantization of the checkpoint, bitsandbytes' own outputs recorded)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from kbit import KbitWarning
from kbit import functional as F
from kbit import nn as knn
from reference import assert_linear_close, dequantize_4bit_state, record_peer
from torch import nn


def _linear(in_features: int = 160, out_features: int = 96, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
def test_from_linear_matches_dequantized_reference(quant_type: str, compress: bool) -> None:
    lin = _linear()
    q = knn.Linear4bit.from_linear(lin, quant_type=quant_type, compress_statistics=compress, blocksize=64)
    assert q.is_quantized and q.weight.dtype == torch.uint8 and q.weight.shape == (160 * 96 // 2, 1)
    assert q.quant_state.nested == compress and not q.weight.requires_grad
    W = q.dequantized_weight()
    w = lin.weight.detach()
    assert W.shape == (96, 160) and float((W - w).abs().max()) < 0.2 * float(w.abs().max())
    with torch.no_grad():
        xb = _x(4, 3, 160)
        assert_linear_close(q(xb), xb, W, lin.bias)  # the fused matmul: float32 sums in its own order
        x1 = _x(1, 160, seed=2)
        assert_linear_close(q(x1), x1, W, lin.bias)


def test_cpu_forward_uses_the_fused_matmul(monkeypatch) -> None:
    """On the CPU every forward (one row or many) is the fused 4-bit matmul, never a dequantized weight."""
    q = knn.Linear4bit.from_linear(_linear())
    calls = []
    real = F._matmul_4bit_absmax

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the forward dequantized the weight")

    monkeypatch.setattr(F, "_matmul_4bit_absmax", spy)
    monkeypatch.setattr(F, "dequantize_4bit", no_dequantize)
    with torch.no_grad():
        assert q(_x(160)).shape == (96,) and q(_x(1, 1, 160)).shape == (1, 1, 96)
        assert q(_x(2, 7, 160)).shape == (2, 7, 96)
    assert calls == [(160,), (1, 1, 160), (2, 7, 160)]
    monkeypatch.undo()
    x = _x(3, 160).requires_grad_()
    q(x).sum().backward()  # gradients flow through the matmul to x and the bias
    assert x.grad is not None and q.bias.grad is not None
    torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0, keepdim=True).expand(3, 160))
    assert torch.equal(q.bias.grad, torch.full((96,), 3.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compute_dtype(dtype: torch.dtype) -> None:
    lin = _linear()
    q = knn.Linear4bit.from_linear(lin, compute_dtype=dtype)
    with torch.no_grad():
        for x in (_x(160), _x(3, 160)):
            y = q(x)
            assert y.dtype == torch.float32
            ref = nn.functional.linear(x.to(dtype), q.dequantized_weight().to(dtype), lin.bias.to(dtype)).float()
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_quantized_on_move_or_first_forward() -> None:
    layer = knn.Linear4bit(64, 32)
    assert not layer.is_quantized and layer.weight.dtype == torch.float32 and layer.weight.shape == (32, 64)
    W = layer.weight.detach().clone()
    assert layer.to("cpu") is layer and layer.is_quantized
    assert torch.equal(layer.weight, F.quantize_4bit(W, compress_statistics=True)[0])
    parent = nn.Sequential(knn.Linear4bit(64, 32))
    parent.to("cpu")
    assert parent[0].is_quantized
    lazy = knn.Linear4bit(64, 32, bias=False, compress_statistics=False)
    with torch.no_grad():
        lazy(_x(64))
    assert lazy.is_quantized and not lazy.quant_state.nested
    assert knn.Linear4bit(64, 32, device="cpu").is_quantized
    meta = knn.Linear4bit(64, 32, device="meta")
    assert not meta.is_quantized and meta.weight.is_meta


def test_half_keeps_codes() -> None:
    q = knn.Linear4bit.from_linear(_linear())
    packed = q.weight.detach().clone()
    q.half()
    assert q.weight.dtype == torch.uint8 and torch.equal(q.weight, packed)
    assert q.quant_state.state2.absmax.dtype == torch.float32 and q.bias.dtype == torch.float16


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_round_trip(compress: bool, quant_type: str) -> None:
    q = knn.Linear4bit.from_linear(_linear(), quant_type=quant_type, compress_statistics=compress, blocksize=128)
    sd = q.state_dict()
    keys = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    keys += ["weight.nested_absmax", "weight.nested_quant_map"] if compress else []
    assert list(sd) == [*keys, f"weight.quant_state.bitsandbytes__{quant_type}"]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded_sd = torch.load(buf, weights_only=True)
    for fresh in (knn.Linear4bit(160, 96, device="meta"), knn.Linear4bit(160, 96, device="cpu"),
                  knn.Linear4bit(160, 96)):
        with pytest.warns(KbitWarning, match=r"^weight: .*the checkpoint's are used.*blocksize 64 -> 128"):
            result = fresh.load_state_dict(loaded_sd)  # built with the defaults: the checkpoint wins, said
        assert not result.missing_keys and not result.unexpected_keys
        assert fresh.quant_type == quant_type and fresh.blocksize == 128 and fresh.quant_state.nested == compress
        with torch.no_grad():
            for x in (_x(160), _x(5, 160)):
                assert torch.equal(fresh(x), q(x))


def test_float_state_dict_is_quantized_on_load() -> None:
    lin = _linear()
    q = knn.Linear4bit(160, 96, device="cpu")
    with pytest.warns(KbitWarning, match=r"^weight: a float weight \(torch.float32\) is loaded into a Linear4bit"):
        q.load_state_dict(lin.state_dict())  # lossy: never silent
    expected = knn.Linear4bit.from_linear(lin)
    assert q.is_quantized and torch.equal(q.weight, expected.weight)
    with torch.no_grad():
        assert torch.equal(q(_x(3, 160)), expected(_x(3, 160)))


def test_load_rejects_mismatch() -> None:
    sd = knn.Linear4bit.from_linear(_linear(64, 32)).state_dict()
    with pytest.raises(RuntimeError, match=r"the saved weight has shape \(32, 64\), this layer \(96, 160\)"):
        knn.Linear4bit(160, 96).load_state_dict(sd)
    bad = dict(sd)
    bad["weight.quant_map"] = "oops"
    with pytest.raises(RuntimeError, match="'quant_map' must be Tensor"):
        knn.Linear4bit(64, 32).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="expected a 4-bit weight with its quant state items"):
        knn.Linear4bit(64, 32).load_state_dict({"weight": torch.zeros(10), "bias": torch.zeros(32)})


def _bnb_layer(lin: nn.Linear, quant_type: str, compress: bool):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compress_statistics=compress, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=compress, blocksize=64)
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    return layer.to("cpu")


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_checkpoint_loads(compress: bool, quant_type: str) -> None:
    lin = _linear(seed=3)
    theirs = _bnb_layer(lin, quant_type, compress)
    bnb_sd = theirs.state_dict()
    ours = knn.Linear4bit.from_linear(lin, quant_type=quant_type, compress_statistics=compress)
    our_sd = ours.state_dict()
    assert list(our_sd) == list(bnb_sd) and all(torch.equal(our_sd[k], bnb_sd[k]) for k in bnb_sd)
    fresh = knn.Linear4bit(160, 96, device="meta", quant_type=quant_type, compress_statistics=compress)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitWarning)  # built as saved: no mismatch warning
        fresh.load_state_dict(bnb_sd)
    # The checkpoint's weight by the format's definition (its JSON item parsed by from_dict).
    W = dequantize_4bit_state(bnb_sd["weight"], F.QuantState4bit.from_dict(
        {k.removeprefix("weight."): v for k, v in bnb_sd.items() if k.startswith("weight.")}))
    bias = bnb_sd["bias"]
    with torch.no_grad():
        xb, x1 = _x(3, 160), _x(160)
        assert_linear_close(fresh(xb), xb, W, bias)
        assert_linear_close(fresh(x1), x1, W, bias)
        for x in (xb, x1):
            record_peer(f"Linear4bit({quant_type}, nested={compress}) forward of {tuple(x.shape)}", theirs(x),
                        nn.functional.linear(x, W, bias), rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        knn.Linear4bit(0, 3)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        knn.Linear4bit(3, 3, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        knn.Linear4bit(3, 3, blocksize=100)
    with pytest.raises(TypeError, match="compute_dtype must be None"):
        knn.Linear4bit(3, 3, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"linear must be a torch\.nn\.Linear"):
        knn.Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    q = knn.Linear4bit.from_linear(_linear())
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 160\), got \(2, 100\)"):
        q(_x(2, 100))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_equals_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = nn.Sequential(knn.Linear4bit.from_linear(_linear(64, 128)), nn.GELU(),
                          knn.Linear4bit.from_linear(_linear(128, 32, seed=1)))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for x in (_x(64), _x(4, 64)):  # the GEMV path and the dequantize path
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_nested_absmax_is_dequantized_once_and_follows_the_state() -> None:
    """The forward keeps a nested state's float32 absmax; a new state (a load, a move) replaces it."""
    a = knn.Linear4bit.from_linear(_linear(seed=0), compress_statistics=True)
    b = knn.Linear4bit.from_linear(_linear(seed=1), compress_statistics=True)
    x = _x(3, 160)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert torch.equal(a(x), ya) and a.__dict__["_absmax_cache"][0] is a.quant_state
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), yb)
        assert_linear_close(a(x), x, b.dequantized_weight(), b.bias)


def test_no_grad_cpu_forward_runs_the_tiled_copy(monkeypatch) -> None:
    """Without gradients, with in_features a multiple of the blocksize, the CPU forward runs
    kbit_matmul_4bit_tiled on a tiled copy of the weight, made once and kept until the weight or its
    state changes (a load, an in-place write, a move); with gradients, or cpu_layout False, the packed
    layout's matmul. Both within the definition's bound of the dequantized weight."""
    from kbit import _native

    lib = _native.cpu_library()
    q = knn.Linear4bit.from_linear(_linear(128, 96), compress_statistics=True)
    x = _x(3, 128)
    W = q.dequantized_weight()
    with torch.no_grad():
        y = q(x)
        assert lib.last_path().startswith("kbit_matmul_4bit_tiled:")
        tiled = q.__dict__["_tiled_cache"][1]
        assert torch.equal(q(x), y) and q.__dict__["_tiled_cache"][1] is tiled  # kept
    assert_linear_close(y, x, W, q.bias)
    assert not any("tiled" in k for k in q.state_dict())  # the copy is not state
    xg = x.clone().requires_grad_()
    yg = q(xg)  # a gradient is wanted: the packed layout's matmul, differentiable
    assert lib.last_path().startswith("kbit_matmul_4bit:") and yg.requires_grad
    assert_linear_close(yg.detach(), x, W, q.bias)
    other = knn.Linear4bit.from_linear(_linear(128, 96, seed=5), compress_statistics=True)
    with torch.no_grad():
        q.load_state_dict(other.state_dict())  # a new state: a new copy
        assert torch.equal(q(x), other(x)) and q.__dict__["_tiled_cache"][1] is not tiled
        q.weight.copy_(knn.Linear4bit.from_linear(_linear(128, 96, seed=6)).weight)  # written in place
        assert_linear_close(q(x), x, q.dequantized_weight(), q.bias)
        q.weight.data.copy_(knn.Linear4bit.from_linear(_linear(128, 96, seed=7)).weight)  # unseen by _version
        q.drop_cpu_layout()
        assert_linear_close(q(x), x, q.dequantized_weight(), q.bias)
        q.cpu_layout = False
        y = q(x)
        assert lib.last_path().startswith("kbit_matmul_4bit:")
        assert_linear_close(y, x, q.dequantized_weight(), q.bias)
    q.cpu_layout = True
    q.to("cpu")  # a move drops the copy
    assert "_tiled_cache" not in q.__dict__
    odd = knn.Linear4bit.from_linear(_linear(160, 96))  # 160 % 64: blocks straddle rows, no tiled layout
    with torch.no_grad():
        odd(x[:, :1].expand(3, 160).contiguous())
    assert lib.last_path().startswith("kbit_matmul_4bit:")


def test_a_layer_made_under_inference_mode_runs_the_tiled_copy() -> None:
    """Tensors made under torch.inference_mode have no version counter: the layer still runs (and keeps)
    its tiled copy, inside inference mode and out of it."""
    with torch.inference_mode():
        q = knn.Linear4bit.from_linear(_linear(128, 64))
        x = _x(2, 128)
        y = q(x)
        assert q.__dict__["_tiled_cache"] is not None and torch.equal(q(x), y)
    assert_linear_close(y, x, q.dequantized_weight(), q.bias)
    with torch.no_grad():
        assert torch.equal(q(x), y)
