"""The codebooks of kbit's formats: bitsandbytes' dynamic 8-bit maps and the NF4/FP4 4-bit tables.

Each is built once per device and shared (`_codebook`): callers must not modify what they get.
"""

from __future__ import annotations

import torch

__all__ = ["CODEBOOK_SIZE", "create_dynamic_map", "dynamic_map"]

CODEBOOK_SIZE = 256


# The 4-bit codebooks, in code order (kbit_math.h: kbit_code4_value): NF4, the quantiles of a normal
# distribution from the QLoRA paper; bitsandbytes' FP4: sign bit, then {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization codebook: 256 float32 values sorted ascending.

    A code is a sign bit (when `signed`), then E zero bits choosing the decimal exponent 10^-E, an
    indicator 1 bit, and the remaining bits as a linear fraction: 2^k evenly spaced midpoints of
    [0.1, 1] at scale 10^-E, with the most fraction bits at the largest scale. 0 and 1 complete it.
    This is the layout of bitsandbytes' `create_dynamic_map` (equal to it for the default arguments;
    only the layouts that fill all 2^total_bits codes exactly are supported).
    """
    sign_bits = 1 if signed else 0
    fraction_total = total_bits - sign_bits
    if total_bits != 8 or max_exponent_bits != 7:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits}) "
            "is not supported: only the full 8-bit map (max_exponent_bits=7, total_bits=8) is"
        )
    values: list[float] = []
    for e in range(max_exponent_bits):
        # The bucket with scale 10^-(max-1-e): fraction_total - max + e fraction bits.
        items = 2 ** (fraction_total - max_exponent_bits + e)
        # float32 midpoints, as the format is stored and as bitsandbytes computes them.
        edges = torch.linspace(0.1, 1.0, items + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        bucket = (10.0 ** (e - (max_exponent_bits - 1)) * mids).tolist()
        values += bucket
        if signed:
            values += [-v for v in bucket]
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:  # pragma: no cover - guarded by the argument check above
        raise AssertionError(f"dynamic map has {len(values)} values")
    return torch.tensor(sorted(values), dtype=torch.float32)

_CODEBOOKS: dict[tuple[str, torch.device], torch.Tensor] = {}


# torch.compile treats a codebook as a constant: it calls this eagerly instead of tracing into it
# (the maps are built with Python floats, which Dynamo cannot trace).
@torch.compiler.assume_constant_result
def _codebook(name: str, device: torch.device) -> torch.Tensor:
    """A shared, cached codebook ("dynamic", "dynamic_unsigned", "nf4", "fp4") on `device`; do not modify it."""
    key = (name, device)
    code = _CODEBOOKS.get(key)
    if code is None:
        if name in ("nf4", "fp4"):
            code = _build_code_4bit(name)
        else:
            code = create_dynamic_map(signed=name == "dynamic")
        code = _CODEBOOKS.setdefault(key, code.to(device))
    return code


def _default_code(device: torch.device) -> torch.Tensor:
    return _codebook("dynamic", device)


def dynamic_map(signed: bool, device: object = "cpu") -> torch.Tensor:
    """create_dynamic_map(signed), cached per device (shared: do not modify it)."""
    return _codebook("dynamic" if signed else "dynamic_unsigned", torch.device(device))  # type: ignore[arg-type]


def _code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    return _codebook(quant_type, device)


def _build_code_4bit(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0  # float32 quotients
    return torch.cat([mags, -mags])
