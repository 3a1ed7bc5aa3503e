"""Nested ("double") 4-bit quantization and the serializable QuantState4bit: against the reference of
the format (tests/reference.py) and bitsandbytes 0.50.2 as the oracle of the format (codes, absmax,
offset, nested state and state-dict bytes equal; state dicts loadable both ways; its dequantized
values recorded, not trusted)."""

from __future__ import annotations

import json

import pytest
import torch
from kbit import functional as F
from reference import dequantize_4bit_state, record_peer

QUANT_TYPES = ["nf4", "fp4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nested_matches_bitsandbytes(quant_type: str, dtype: torch.dtype, blocksize: int) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for shape in [(300, 129), (64, 64), (7,)]:  # several nested blocks, one exact one, a single absmax
        A = weight(shape, dtype, seed=blocksize)
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        bp, bs = bnb_f.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert state.nested and bs.nested
        assert torch.equal(packed, bp)
        assert torch.equal(state.absmax, bs.absmax) and state.absmax.dtype == torch.uint8
        assert torch.equal(state.offset, bs.offset)
        assert torch.equal(state.state2.absmax, bs.state2.absmax)
        assert torch.equal(state.state2.code, bs.state2.code) and state.state2.blocksize == bs.state2.blocksize == 256
        ours = F.dequantize_4bit(packed, state)
        assert ours.shape == A.shape and ours.dtype == dtype
        expected = dequantize_4bit_state(packed, state)
        assert torch.equal(ours, expected)
        record_peer(f"dequantize_4bit({quant_type}, {dtype}, blocksize {blocksize}, nested) of {shape}",
                    bnb_f.dequantize_4bit(bp, bs), expected)


def test_nested_close_to_plain() -> None:
    A = weight((256, 256), torch.float32, seed=3)
    packed, plain = F.quantize_4bit(A, compress_statistics=False)
    packed2, nested = F.quantize_4bit(A, compress_statistics=True)
    assert torch.equal(packed, packed2)
    d_plain, d_nested = F.dequantize_4bit(packed, plain), F.dequantize_4bit(packed, nested)
    # the absmax error of 8-bit dynamic quantization is well under 1% of the largest absmax
    assert float((d_plain - d_nested).abs().max()) < 0.01 * float(plain.absmax.max())


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_as_dict_keys_and_round_trip(compress: bool, quant_type: str) -> None:
    A = weight((96, 80), torch.bfloat16)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=compress)
    d = state.as_dict(packed=True)
    key = f"quant_state.bitsandbytes__{quant_type}"
    tensor_keys = {"absmax", "quant_map", *(["nested_absmax", "nested_quant_map"] if compress else [])}
    assert set(d) == tensor_keys | {key}
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    scalars = json.loads(bytes(d[key].tolist()))
    expected = {"quant_type": quant_type, "blocksize": 64, "dtype": "bfloat16", "shape": [96, 80]}
    if compress:
        expected.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(state.offset))
    assert scalars == expected
    unpacked = state.as_dict(packed=False)
    assert unpacked["shape"] == (96, 80) and unpacked["quant_type"] == quant_type
    for qs in (d, unpacked, {f"model.layers.0.weight.{k}": v for k, v in d.items()}):
        loaded = F.QuantState4bit.from_dict(qs, device="cpu")
        assert loaded.nested == compress and loaded.shape == state.shape and loaded.dtype == state.dtype
        assert torch.equal(F.dequantize_4bit(packed, loaded), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bitsandbytes_state_dict_loads_in_kbit(compress: bool, quant_type: str) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    A = weight((128, 72), torch.float16, seed=5)
    bp, bs = bnb_f.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=compress)
    d = {f"weight.{k}": v for k, v in bs.as_dict(packed=True).items()}
    state = F.QuantState4bit.from_dict(d, device="cpu")
    assert state.nested == compress and state.shape == A.shape and state.dtype == torch.float16
    expected = dequantize_4bit_state(bp, bs)  # what bitsandbytes' state says, from the definition
    assert torch.equal(F.dequantize_4bit(bp, state), expected)
    record_peer(f"dequantize_4bit({quant_type})", bnb_f.dequantize_4bit(bp, bs), expected)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_kbit_state_dict_loads_in_bitsandbytes(compress: bool, quant_type: str) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    A = weight((128, 72), torch.float32, seed=6)
    packed, state = F.quantize_4bit(A, blocksize=128, quant_type=quant_type, compress_statistics=compress)
    d = state.as_dict(packed=True)
    bs = bnb_f.QuantState.from_dict(dict(d), device=torch.device("cpu"))
    assert bs.nested == compress and bs.shape == A.shape and bs.blocksize == 128
    # bitsandbytes' state from kbit's dict holds kbit's tensors (the format), whatever it computes from them
    assert torch.equal(bs.absmax, state.absmax) and torch.equal(bs.code, state.code)
    if compress:
        assert torch.equal(bs.offset, state.offset) and torch.equal(bs.state2.absmax, state.state2.absmax)
    record_peer(f"dequantize_4bit({quant_type}) of a kbit state", bnb_f.dequantize_4bit(packed, bs),
                dequantize_4bit_state(packed, state))
    # the packed JSON tensor is byte-identical to what bitsandbytes writes for the same state
    _, bnb_state = bnb_f.quantize_4bit(A, blocksize=128, quant_type=quant_type, compress_statistics=compress)
    key = f"quant_state.bitsandbytes__{quant_type}"
    assert torch.equal(d[key], bnb_state.as_dict(packed=True)[key])


def test_to_moves_every_tensor() -> None:
    _, state = F.quantize_4bit(weight((64, 64), torch.float32), compress_statistics=True)
    moved = state.to("meta")
    assert moved.absmax.is_meta and moved.code.is_meta and moved.offset.is_meta
    assert moved.state2.absmax.is_meta and moved.state2.code.is_meta
    assert moved.blocksize == state.blocksize and not state.absmax.is_meta


def _good_dict() -> dict:
    _, state = F.quantize_4bit(weight((64, 64), torch.float32), compress_statistics=True)
    return state.as_dict(packed=False)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("absmax"), "'absmax' is missing"),
        (lambda d: d.pop("nested_offset"), "a nested quant state needs all of"),
        (lambda d: d.update(quant_type="int4"), "quant_type must be 'nf4' or 'fp4'"),
        (lambda d: d.update(blocksize=100), "blocksize must be one of"),
        (lambda d: d.update(blocksize="64"), "'blocksize' must be int"),
        (lambda d: d.update(dtype="int8"), "'dtype' must name float32, float16 or bfloat16"),
        (lambda d: d.update(shape=None), "'shape' must be list or tuple"),
        (lambda d: d.update(extra=1), "unknown quant state items ['extra']"),
    ],
)
def test_from_dict_rejects(change, message: str) -> None:
    d = _good_dict()
    change(d)
    with pytest.raises(ValueError) as info:
        F.QuantState4bit.from_dict(d)
    assert message in str(info.value)


def test_from_dict_rejects_bad_packed_item() -> None:
    blob = torch.frombuffer(bytearray(b'{"quant_type": "fp4"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type matches the key's suffix"):
        F.QuantState4bit.from_dict({"quant_state.bitsandbytes__nf4": blob})
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        F.QuantState4bit.from_dict({"quant_state.bitsandbytes__nf4": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(TypeError, match="qs_dict must be a mapping"):
        F.QuantState4bit.from_dict([("absmax", 1)])
