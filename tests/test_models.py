"""Whole models: a tiny random Llama quantized by transformers + bitsandbytes on CPU loads into kbit
(kbit.nn.load_4bit_checkpoint), and one quantized by kbit (replace_linear_4bit, save_4bit_checkpoint)
loads into transformers. kbit's logits are judged against a reference model: the float model whose
quantized linears are replaced by the reference dequantization (tests/reference.py) of the
checkpoint's own tensors. bitsandbytes' and transformers' computed logits only go to record_peer;
the keys, dtypes and bytes they write and read are format facts and are asserted.

transformers, bitsandbytes, accelerate and safetensors are test dependencies (noxfile TEST_DEPS): a
missing one fails this file at import, it never skips."""

from __future__ import annotations

import json
import logging
import math
import warnings

import bitsandbytes as bnb
import pytest
import torch
import transformers
from kbit import KbitLoadError, KbitWarning
from kbit import functional as F
from kbit import nn as knn
from reference import dequantize_4bit_state, record_peer
from safetensors.torch import load_file, save_file
from torch import nn

SUFFIX = ".weight.quant_state.bitsandbytes__"
# Linear layers of the tiny Llama (7 per decoder layer); lm_head stays float as transformers keeps it.
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])  # 8 tokens: the dequantize + matmul path


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def _float_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    _float_model().save_pretrained(path)
    return path


def _bnb_quantized(float_dir, quant_type: str, double: bool, compute: torch.dtype):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=compute)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and bitsandbytes' own notices
        return transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).eval()


def _layer_state(sd: dict, name: str) -> F.QuantState4bit:
    prefix = f"{name}.weight."
    return F.QuantState4bit.from_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


class RefLinear(nn.Module):
    """The reference of a Linear4bit: x cast to the compute dtype, times the reference-dequantized
    weight in that dtype, cast back to x's dtype (Linear4bit's definition, in plain torch)."""

    def __init__(self, weight: torch.Tensor, bias, compute) -> None:
        super().__init__()
        self.w, self.b, self.compute = weight, bias, compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.compute or x.dtype
        return nn.functional.linear(x.to(c), self.w.to(c), None if self.b is None else self.b.to(c)).to(x.dtype)


def _reference(sd: dict, compute) -> transformers.LlamaForCausalLM:
    """The float model with every layer the checkpoint holds in 4 bits replaced by RefLinear."""
    ref = _float_model(seed=123)
    quantized = sorted({k.split(SUFFIX)[0] for k in sd if SUFFIX in k})
    for name in quantized:
        W = dequantize_4bit_state(sd[f"{name}.weight"], _layer_state(sd, name)).float()
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, RefLinear(W, sd.get(f"{name}.bias"), compute))
    floats = {k: v for k, v in sd.items() if k.split(".weight")[0] not in quantized}
    result = ref.load_state_dict(floats, strict=False)
    assert not result.unexpected_keys and all(k.split(".weight")[0] in quantized for k in result.missing_keys)
    return ref.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _assert_reference_logits(got: torch.Tensor, expected: torch.Tensor, compute) -> None:
    """Logits against the reference model's. kbit's CPU forward is a fused 4-bit matmul, which sums in
    its own order (kbit.h), so every linear differs from RefLinear's by float32 reassociation (k * 2^-24
    of sum |x| |W|: tests/test_kernels_*.py check single layers to that bound); through the model that
    stays far below the logits' scale (measured on the AMD EPYC: at most 1.8e-7 of 0.52; the tolerance
    is 2^-18 of the scale). In bfloat16 the definition lets a kernel round the weight to bfloat16 or
    not (W' exactly on AVX2 and AVX-512 without BF16; the codebook rounded, the absmax not, in the tiled
    AVX-512-BF16 kernel), while RefLinear rounds W' itself: 2^-9 per weight, random signs. Through the
    model that is 1.7e-3 to 2.6e-3 of 0.52 on every path here (KBIT_CPU_SIMD=avx2 and the default), so
    the tolerance is 2^-6 of the scale. A wrong code, block or nibble moves logits far more (a block
    scale off by one block in the bfloat16 kernel: 0.015 to 0.02, failing here; test_kernels_tiled.py
    holds each layer to the tight bound)."""
    tol = (2.0**-6 if compute == torch.bfloat16 else 2.0**-18) * float(expected.abs().max())
    err = float((got.float() - expected.float()).abs().max())
    assert err <= tol, f"logits differ from the reference's by {err:.3g} (tolerance {tol:.3g}, {compute})"


def _strict():
    """kbit warnings become errors: a load that should be clean must be."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", KbitWarning)
    return ctx


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_checkpoint_loads(float_dir, tmp_path, quant_type: str, double: bool, compute) -> None:
    theirs = _bnb_quantized(float_dir, quant_type, double, compute)
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    theirs.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sorted({k.split(SUFFIX)[0] for k in sd if SUFFIX in k}) == sorted(LAYERS)

    model = _float_model(seed=7)  # other weights: everything must come from the checkpoint
    ctx = _strict()
    try:
        assert knn.load_4bit_checkpoint(model, tmp_path) is model
    finally:
        ctx.__exit__(None, None, None)
    for name, m in model.named_modules():
        if name in LAYERS:
            assert isinstance(m, knn.Linear4bit) and m.quant_type == quant_type and m.blocksize == 64
            assert m.quant_state.nested == double
            assert m.compute_dtype == compute  # from config.json's quantization_config (problem 3)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    # Same keys and bytes back: the format holds.
    ours = model.state_dict()
    assert set(ours) == set(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)

    ref = _reference(sd, compute)
    expected = _logits(ref)
    got = _logits(model)
    _assert_reference_logits(got, expected, compute)
    record_peer(f"transformers+bitsandbytes Llama logits ({quant_type}, double quant {double}, {compute})",
                _logits(theirs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kbit_checkpoint_loads_in_transformers(tmp_path, quant_type: str, double: bool) -> None:
    model = knn.replace_linear_4bit(_float_model(), quant_type=quant_type, compress_statistics=double,
                                    compute_dtype=torch.float32)
    assert [n for n, m in model.named_modules() if isinstance(m, knn.Linear4bit)] == LAYERS
    knn.save_4bit_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == quant_type
    assert qc["bnb_4bit_use_double_quant"] == double and qc["bnb_4bit_compute_dtype"] == "float32"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    sd = load_file(str(tmp_path / "model.safetensors"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)] == LAYERS
    assert type(theirs.lm_head) is nn.Linear
    # transformers + bitsandbytes read kbit's tensors as written (a format fact) ...
    their_sd = theirs.state_dict()
    assert set(their_sd) == set(sd) and all(torch.equal(their_sd[k], sd[k]) for k in sd)
    expected = _logits(_reference(sd, torch.float32))
    _assert_reference_logits(_logits(model), expected, torch.float32)
    # ... and what they compute from them is bitsandbytes' CPU kernels' business: recorded.
    record_peer(f"transformers Llama logits from kbit's checkpoint ({quant_type}, double quant {double})",
                _logits(theirs), expected, rtol=1e-5, atol=1e-5)

    again = knn.load_4bit_checkpoint(_float_model(seed=9), tmp_path)
    assert torch.equal(_logits(again), _logits(model))


def test_safetensors_save_file_round_trip(tmp_path) -> None:
    # Problem 5: every layer's quant_map was the one cached codebook tensor ("Some tensors share memory").
    model = knn.replace_linear_4bit(_float_model(), compress_statistics=True)
    sd = model.state_dict()
    maps = [sd[f"{n}.weight.quant_map"] for n in LAYERS]
    assert len({t.untyped_storage().data_ptr() for t in maps}) == len(maps)
    save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    again = knn.load_4bit_checkpoint(_float_model(seed=5), tmp_path / "m.safetensors")
    assert torch.equal(_logits(again), _logits(model))
    _assert_reference_logits(_logits(model), _logits(_reference(loaded, None)), torch.float32)


def test_sharded_folder_and_state_dict_sources(tmp_path) -> None:
    model = knn.replace_linear_4bit(_float_model(), quant_type="fp4")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected = _logits(model)
    assert torch.equal(_logits(knn.load_4bit_checkpoint(_float_model(seed=3), tmp_path)), expected)
    assert torch.equal(_logits(knn.load_4bit_checkpoint(_float_model(seed=3), sd)), expected)


def test_replace_skips_lm_head_and_named_modules(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="kbit.nn"):
        model = knn.replace_linear_4bit(_float_model())
    assert type(model.lm_head) is nn.Linear
    assert "model.layers.1.mlp.down_proj" in caplog.text and "kept: ['lm_head']" in caplog.text
    # skip replaces the default: by suffix, and a parent keeps all of its children.
    model = knn.replace_linear_4bit(_float_model(), skip=("lm_head", "mlp.down_proj", "model.layers.1.self_attn"))
    q = {n for n, m in model.named_modules() if isinstance(m, knn.Linear4bit)}
    assert q == {n for n in LAYERS if not n.endswith("down_proj") and not n.startswith("model.layers.1.self_attn")}
    everything = knn.replace_linear_4bit(_float_model(), skip=())
    assert isinstance(everything.lm_head, knn.Linear4bit)
    with pytest.raises(TypeError, match="from_linear"):
        knn.replace_linear_4bit(nn.Linear(4, 4))


@pytest.fixture(scope="module")
def bnb_sd(float_dir, tmp_path_factory):
    """The state dict and folder of a bitsandbytes nf4 double-quant, float32-compute checkpoint."""
    path = tmp_path_factory.mktemp("bnb")
    _bnb_quantized(float_dir, "nf4", True, torch.float32).save_pretrained(path)
    return load_file(str(path / "model.safetensors")), path


def test_float_lm_head_into_linear4bit_is_not_silent(bnb_sd) -> None:
    # Problem 2: a hand-swapped lm_head loaded the float weight and quantized it at the first forward.
    sd, path = bnb_sd
    model = knn.replace_linear_4bit(_float_model(), skip=())
    with pytest.warns(KbitWarning, match=r"^lm_head\.weight: a float weight \(torch\.float32\) is loaded into a "
                                         r"Linear4bit; it will be quantized"):
        model.load_state_dict(sd)
    model = knn.replace_linear_4bit(_float_model(), skip=())
    with pytest.raises(KbitLoadError, match=r"^lm_head\.weight: the checkpoint holds a float weight but the "
                                            r"model's lm_head is a Linear4bit"):
        knn.load_4bit_checkpoint(model, path)


def test_constructor_mismatch_warns_and_checkpoint_wins(bnb_sd) -> None:
    # Problem 4: a layer built fp4 / blocksize 128 silently became nf4 / 64.
    sd, _ = bnb_sd
    model = _float_model()
    layer = knn.Linear4bit(64, 128, bias=False, quant_type="fp4", blocksize=128, compress_statistics=True)
    model.model.layers[0].mlp.up_proj = layer
    with pytest.warns(KbitWarning, match=r"^model\.layers\.0\.mlp\.up_proj\.weight: .*the checkpoint's are used "
                                         r"\(this layer's -> the checkpoint's\): quant_type 'fp4' -> 'nf4', "
                                         r"blocksize 128 -> 64$"):
        model.load_state_dict({k: v for k, v in sd.items() if k.startswith("model.layers.0.mlp.up_proj.")},
                              strict=False)
    assert layer.quant_type == "nf4" and layer.blocksize == 64


def test_explicit_arguments_that_contradict_the_checkpoint(bnb_sd) -> None:
    sd, path = bnb_sd
    key = r"model\.layers\.\d\.\w+\.\w+_proj\.weight\.quant_state\.bitsandbytes__nf4"
    with pytest.raises(ValueError, match=rf"quant_type='fp4' contradicts the checkpoint: {key} says 'nf4'"):
        knn.load_4bit_checkpoint(_float_model(), path, quant_type="fp4")
    with pytest.raises(ValueError, match=rf"compress_statistics=False contradicts the checkpoint: {key} says True"):
        knn.load_4bit_checkpoint(_float_model(), sd, compress_statistics=False)
    with pytest.raises(ValueError, match=r"compute_dtype=torch\.bfloat16 contradicts the checkpoint's "
                                         r"quantization_config\.bnb_4bit_compute_dtype \(torch\.float32\)"):
        knn.load_4bit_checkpoint(_float_model(), path, compute_dtype=torch.bfloat16)
    # Agreeing arguments are fine; a bare state dict has no config, so compute_dtype is the caller's.
    model = knn.load_4bit_checkpoint(_float_model(), sd, quant_type="nf4", blocksize=64,
                                     compute_dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_half_absmax_is_upcast_exactly_at_load(half, double: bool) -> None:
    # Problem 6: bitsandbytes writes bf16 absmax on some CPUs; such a checkpoint failed at the first forward.
    sd = knn.replace_linear_4bit(_float_model(), compress_statistics=double).state_dict()
    item = "nested_absmax" if double else "absmax"
    halved = {k: (v.to(half) if k.endswith(f".weight.{item}") else v) for k, v in sd.items()}
    model = knn.load_4bit_checkpoint(_float_model(seed=4), halved)
    state = model.model.layers[1].mlp.up_proj.quant_state
    stats = state.state2.absmax if double else state.absmax
    assert stats.dtype == torch.float32
    assert torch.equal(stats, halved[f"model.layers.1.mlp.up_proj.weight.{item}"].float())
    upcast = {k: (v.float() if k.endswith(f".weight.{item}") else v) for k, v in halved.items()}
    _assert_reference_logits(_logits(model), _logits(_reference(upcast, None)), torch.float32)


def _bad(sd: dict, key: str, value) -> dict:
    bad = dict(sd)
    bad[key] = value
    return bad


def test_bad_state_tensor_fails_at_load_naming_the_key(bnb_sd) -> None:
    sd, _ = bnb_sd
    layer = "model.layers.0.mlp.up_proj.weight"
    absmax, nested = sd[f"{layer}.absmax"], sd[f"{layer}.nested_absmax"]
    cases = [
        (f"{layer}.absmax", absmax.float(), "a nested .* absmax must be a 1-D uint8 tensor of 128 codes"),
        (f"{layer}.absmax", absmax[:-1], "a nested .* absmax must be a 1-D uint8 tensor of 128 codes"),
        (f"{layer}.nested_absmax", nested.double(), r"must be a 1-D float32 \(or float16/bfloat16\) tensor of 1"),
        (f"{layer}.nested_absmax", nested.repeat(2), r"got torch\.float32 of shape \(2,\)"),
        (f"{layer}.quant_map", sd[f"{layer}.quant_map"].half(), "must be a 1-D float32 tensor of 16 values"),
        (f"{layer}.quant_map", F.get_4bit_code("fp4"), "is not the nf4 codebook"),
        (f"{layer}.nested_quant_map", sd[f"{layer}.nested_quant_map"][:128], "tensor of 256 values"),
    ]
    for key, value, message in cases:
        for load in (lambda m, s: m.load_state_dict(s), knn.load_4bit_checkpoint):
            model = knn.replace_linear_4bit(_float_model())
            with pytest.raises(RuntimeError, match=rf"{key.replace('.', chr(92) + '.')}: .*{message}"):
                load(model, _bad(sd, key, value))
    plain = knn.replace_linear_4bit(_float_model(), compress_statistics=False).state_dict()
    key = f"{layer}.absmax"
    for value in (plain[key].to(torch.int32), plain[key][:-2], plain[key].reshape(2, -1)):
        with pytest.raises(RuntimeError, match=rf"{key.replace('.', chr(92) + '.')}: must be a 1-D float32"):
            knn.load_4bit_checkpoint(_float_model(), _bad(plain, key, value))


def test_keys_that_do_not_fit(bnb_sd) -> None:
    sd, _ = bnb_sd
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(KbitLoadError, match=r"missing from the checkpoint: model\.norm\.weight"):
        knn.load_4bit_checkpoint(_float_model(), missing)
    with pytest.raises(KbitLoadError, match=r"not in the model: model\.extra\.weight"):
        knn.load_4bit_checkpoint(_float_model(), _bad(sd, "model.extra.weight", torch.zeros(3)))
    layer = "model.layers.0.mlp.up_proj.weight"
    no_absmax = {k: v for k, v in sd.items() if k != f"{layer}.absmax"}
    with pytest.raises(KbitLoadError, match=rf"{layer.replace('.', chr(92) + '.')}: quant state item 'absmax' is missing"):
        knn.load_4bit_checkpoint(_float_model(), no_absmax)
    orphan = {k: v for k, v in sd.items() if k != f"{layer}.quant_state.bitsandbytes__nf4"}
    with pytest.raises(KbitLoadError, match=rf"{layer.replace('.', chr(92) + '.')}\.absmax: a 4-bit state item without"):
        knn.load_4bit_checkpoint(_float_model(), orphan)
    # A 4-bit layer whose module is not a Linear, and one the model does not have.
    moved = {k.replace("model.layers.0.mlp.up_proj.", "model.embed_tokens."): v for k, v in sd.items()
             if k.startswith("model.layers.0.mlp.up_proj.")}
    model = _float_model()
    with pytest.raises(KbitLoadError, match=r"^model\.embed_tokens\.weight: .*model's model\.embed_tokens is a "
                                            r"Embedding, not a torch\.nn\.Linear"):
        knn.load_4bit_checkpoint(model, {**sd, **moved})
    ghost = {k.replace("model.layers.0.", "model.layers.9."): v for k, v in sd.items()
             if k.startswith("model.layers.0.mlp.up_proj.")}
    with pytest.raises(KbitLoadError, match=r"^model\.layers\.9\.mlp\.up_proj\.weight: .* that the model does not have"):
        knn.load_4bit_checkpoint(_float_model(), {**sd, **ghost})


def test_tied_lm_head_is_saved_once_and_loads(tmp_path) -> None:
    cfg = _config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = knn.replace_linear_4bit(transformers.LlamaForCausalLM(cfg).eval())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    knn.save_4bit_checkpoint(model, tmp_path)
    assert math.prod(load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"].shape) == 128 * 64
    torch.manual_seed(1)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    knn.load_4bit_checkpoint(fresh, tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))


def test_transformers_quantization_method(float_dir, tmp_path) -> None:
    from kbit.integrations.transformers import KbitConfig

    cfg = KbitConfig(quant_type="fp4", compress_statistics=False, blocksize=128, compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).eval()
    assert [n for n, m in model.named_modules() if isinstance(m, knn.Linear4bit)] == LAYERS
    assert type(model.lm_head) is nn.Linear
    layer = model.model.layers[0].mlp.up_proj
    assert layer.is_quantized and layer.quant_type == "fp4" and layer.blocksize == 128
    assert not layer.quant_state.nested and layer.compute_dtype == torch.bfloat16
    # The same as kbit's helper on the same float weights, and the reference of its own tensors.
    helper = knn.replace_linear_4bit(_float_model(), quant_type="fp4", compress_statistics=False, blocksize=128,
                                     compute_dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in helper.state_dict().items())
    expected = _logits(model)
    _assert_reference_logits(expected, _logits(_reference(sd, torch.bfloat16)), torch.bfloat16)
    # save_pretrained writes quant_method "kbit" and bitsandbytes' keys; from_pretrained reads them back.
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "kbit" and qc["quant_type"] == "fp4" and qc["compute_dtype"] == "bfloat16"
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitWarning)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again.model.layers[1].self_attn.q_proj, knn.Linear4bit)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(_logits(again), expected)


def test_kbit_imports_without_transformers(run_python) -> None:
    code = ("import sys, kbit.nn as knn, torch; knn.replace_linear_4bit(torch.nn.Sequential(torch.nn.Linear(8, 8)));"
            "assert 'transformers' not in sys.modules and 'safetensors' not in sys.modules, sorted(sys.modules)")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
