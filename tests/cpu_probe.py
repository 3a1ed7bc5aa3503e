"""Calls libkbit_cpu.so's entry points through ctypes on deterministic inputs and prints, as JSON, the
sha256 of every output ("digests") and the kernel each call ran, as kbit_last_path() says, with the
call's shape ("paths"). Standard library and kbit's own stdlib-only ABI table (kbit._abi, the
signatures of kbit.h) only, no torch, no numpy, so that tests/test_cpu_models.py can run it as another
CPU under qemu-x86_64 -cpu MODEL and compare the bytes and paths with a native run.

    python tests/cpu_probe.py LIB CODEBOOKS   (CODEBOOKS: the signed and unsigned dynamic 8-bit maps,
                                               256 float32 each, written by the test)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import struct
import sys
from array import array

from kbit._abi import load_abi

F32, F16, BF16 = 0, 1, 2
FP4, NF4 = 0, 1
N = 1 << 16


def floats(n: int, seed: int, scale: float = 1.0) -> array:
    """n normal float32 values; a block of specials (inf, NaN, zeros, a subnormal) at 256..383."""
    rng = random.Random(seed)
    a = array("f", (rng.gauss(0.0, scale) for _ in range(n)))
    if n >= 384:
        a[256], a[257], a[300] = float("inf"), float("nan"), -float("inf")
        for i in range(320, 384):
            a[i] = 0.0
        a[258] = 1e-40
    return a


def as_dtype(a: array, dtype: int) -> bytes:
    if dtype == F32:
        return a.tobytes()
    if dtype == F16:
        inf = float("inf")  # finite values clamped to float16's range (struct refuses larger ones)
        return struct.pack(f"<{len(a)}e", *(v if v != v or abs(v) == inf else max(-65504.0, min(65504.0, v))
                                             for v in a))
    words = array("I", a.tobytes())  # bf16: the high half of each float32 (truncated; any bits will do)
    return array("H", (w >> 16 for w in words)).tobytes()


def buffer(data: bytes | int) -> ctypes.Array:
    """Exactly len(data) writable bytes holding data (or that many zero bytes)."""
    if isinstance(data, int):
        return (ctypes.c_char * max(data, 1))()
    return (ctypes.c_char * max(len(data), 1)).from_buffer_copy(data or b"\0")


# Per float kind: (array typecode, exponent-and-mantissa mask, the largest non-NaN magnitude, the NaN used)
_NAN = {"f32": ("I", 0x7FFFFFFF, 0x7F800000, 0x7FC00000), "f16": ("H", 0x7FFF, 0x7C00, 0x7E00),
        "bf16": ("H", 0x7FFF, 0x7F80, 0x7FC0)}
KIND = {F32: "f32", F16: "f16", BF16: "bf16"}
# check()'s label of a call -> the entry point it called (without kbit_)
CALLED = {"q8": "quantize_blockwise_8bit", "d8": "dequantize_blockwise_8bit", "q4": "quantize_4bit",
          "q4 W": "quantize_4bit", "d4": "dequantize_4bit", "gemv": "gemv_4bit", "matmul": "matmul_4bit",
          "repack": "repack_4bit_tiled", "tiled": "matmul_4bit_tiled",
          "adam": "adam_8bit_blockwise"}


def digest(*bufs: tuple[ctypes.Array, str]) -> str:
    """sha256 of the buffers; in float buffers (kind f32/f16/bf16; "u8": none) every NaN counts as one
    NaN: which NaN an invalid operation makes is the CPU's (x86 hardware: the negative one), and
    qemu-x86_64 7.2 makes the positive one, so NaN bits are not compared across CPUs."""
    h = hashlib.sha256()
    for b, kind in bufs:
        data = bytes(b)
        if kind != "u8":
            code, mask, inf, nan = _NAN[kind]
            words = array(code, data)
            data = array(code, (nan if (w & mask) > inf else w for w in words)).tobytes()
        h.update(data)
    return h.hexdigest()


def main(lib_path: str, codebooks_path: str) -> dict[str, object]:
    lib = ctypes.CDLL(lib_path)
    for name, (restype, argtypes) in load_abi().signatures().items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    paths: list[dict[str, object]] = []

    def check(status: int, what: str, **shape: object) -> None:
        if status != 0:
            raise SystemExit(f"{what}: status {status}")
        paths.append({"call": CALLED[what], "ran": lib.kbit_last_path().decode(), "shape": shape})

    with open(codebooks_path, "rb") as f:
        books = f.read()
    code_signed, code_unsigned = buffer(books[:1024]), buffer(books[1024:2048])
    out: dict[str, str] = {}
    values = floats(N, seed=1, scale=3.0)
    for dtype in (F32, F16, BF16):
        A = buffer(as_dtype(values, dtype))
        for bs in (64, 4096):
            codes, absmax = buffer(N), buffer(4 * (N // bs))
            check(lib.kbit_quantize_blockwise_8bit(dtype, A, code_signed, codes, absmax, N, bs, None), "q8", n=N)
            back = buffer(len(bytes(A)))
            check(lib.kbit_dequantize_blockwise_8bit(dtype, codes, code_signed, absmax, back, N, bs, None), "d8")
            out[f"blockwise8/{dtype}/{bs}"] = digest((codes, "u8"), (absmax, "f32"), (back, KIND[dtype]))
        for quant in (NF4, FP4):
            for bs in (64, 256):
                n = N - 3  # a partial last block and an odd count
                packed, absmax = buffer((n + 1) // 2), buffer(4 * -(-n // bs))
                check(lib.kbit_quantize_4bit(dtype, quant, A, packed, absmax, n, bs, None), "q4")
                back = buffer(2 * n if dtype else 4 * n)
                check(lib.kbit_dequantize_4bit(dtype, quant, packed, absmax, back, n, bs, None), "d4")
                out[f"4bit/{dtype}/{quant}/{bs}"] = digest((packed, "u8"), (absmax, "f32"), (back, KIND[dtype]))
        # GEMV: a 256 x 256 NF4 weight (whole blocks per row) and 100 x 77 (blocks straddling rows)
        for n_out, k_in in ((256, 256), (100, 77)):
            W = buffer(as_dtype(floats(n_out * k_in, seed=2), dtype))
            packed, absmax = buffer((n_out * k_in + 1) // 2), buffer(4 * -(-(n_out * k_in) // 64))
            check(lib.kbit_quantize_4bit(dtype, NF4, W, packed, absmax, n_out * k_in, 64, None), "q4 W")
            x = buffer(as_dtype(floats(k_in, seed=3), dtype))
            bias = buffer(as_dtype(floats(n_out, seed=4), dtype))
            y = buffer(len(bytes(bias)))
            check(lib.kbit_gemv_4bit(dtype, NF4, x, packed, absmax, bias, y, n_out, k_in, 64, None), "gemv")
            out[f"gemv/{dtype}/{n_out}x{k_in}"] = digest((y, KIND[dtype]))
        # The matmul: 1 and 3 rows (the direct kernels), 9 rows (the tiled one), blocks straddling rows
        for m, n_out, k_in in ((1, 64, 256), (3, 36, 128), (9, 40, 192), (5, 30, 77)):
            W = buffer(as_dtype(floats(n_out * k_in, seed=6), dtype))
            packed, absmax = buffer((n_out * k_in + 1) // 2), buffer(4 * -(-(n_out * k_in) // 64))
            check(lib.kbit_quantize_4bit(dtype, NF4, W, packed, absmax, n_out * k_in, 64, None), "q4 W")
            x = buffer(as_dtype(floats(m * k_in, seed=7), dtype))
            bias = buffer(as_dtype(floats(n_out, seed=8), dtype))
            y = buffer(len(bytes(bias)) * m)
            check(lib.kbit_matmul_4bit(dtype, NF4, x, packed, absmax, bias, y, m, n_out, k_in, 64, None), "matmul",
                  bf16=dtype == BF16, m_rows=m, k_in=k_in, blocksize=64)
            out[f"matmul/{dtype}/{m}x{n_out}x{k_in}"] = digest((y, KIND[dtype]))
        # The tiled layout and its matmul: one row (two groups of 64 columns at once in float32), 9 rows
        # (the 8-row kernel + 1), partial last groups
        for m, n_out, k_in in ((1, 130, 256), (9, 70, 128)):
            W = buffer(as_dtype(floats(n_out * k_in, seed=9), dtype))
            packed, absmax = buffer((n_out * k_in + 1) // 2), buffer(4 * (n_out * k_in // 64))
            check(lib.kbit_quantize_4bit(dtype, NF4, W, packed, absmax, n_out * k_in, 64, None), "q4 W")
            groups = -(-n_out // 64)
            tiled, scales = buffer(groups * 32 * k_in), buffer(4 * groups * 64 * (k_in // 64))
            check(lib.kbit_repack_4bit_tiled(packed, absmax, tiled, scales, n_out, k_in, 64), "repack")
            x = buffer(as_dtype(floats(m * k_in, seed=10), dtype))
            bias = buffer(as_dtype(floats(n_out, seed=11), dtype))
            y = buffer(len(bytes(bias)) * m)
            check(lib.kbit_matmul_4bit_tiled(dtype, NF4, x, tiled, scales, bias, y, m, n_out, k_in, 64, None), "tiled",
                  bf16=dtype == BF16)
            out[f"repack/{dtype}/{n_out}x{k_in}"] = digest((tiled, "u8"), (scales, "f32"))
            out[f"tiled/{dtype}/{m}x{n_out}x{k_in}"] = digest((y, KIND[dtype]))
        # Two Adam steps (the second from the first's states), and AdamW
        n = 5000
        for decoupled in (0, 1):
            p = buffer(as_dtype(floats(n, seed=5), dtype))
            s1, s2, a1, a2 = buffer(n), buffer(n), buffer(4 * -(-n // 256)), buffer(4 * -(-n // 256))
            for step in (1, 2):
                g = buffer(as_dtype(floats(n, seed=5 + step, scale=0.1), dtype))
                check(lib.kbit_adam_8bit_blockwise(dtype, p, g, s1, s2, a1, a2, code_signed, code_unsigned, 0.9,
                                                   0.995, 1e-8, 0.01, 1e-3, step, 1.0, decoupled, n, None), "adam")
            out[f"adam/{dtype}/{decoupled}"] = digest((p, KIND[dtype]), (s1, "u8"), (s2, "u8"), (a1, "f32"), (a2, "f32"))
    return {"digests": out, "paths": paths}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2]), sort_keys=True))
