"""Compare libkbit_cpu.so with bitsandbytes' CPU blockwise 8-bit and 4-bit (NF4/FP4) paths (the test oracle).

Run: /work/venvs/oracle/bin/python tests/native/check_cpu_oracle.py [path/to/libkbit_cpu.so]
(default: /tmp/kb-cpu/libkbit_cpu.so). Exits non-zero on any mismatch.
"""

from __future__ import annotations

import ctypes
import sys
import time

import bitsandbytes.functional as F
import torch

KBIT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.kbit_build_info.restype = ctypes.c_char_p
    lib.kbit_status_string.restype = ctypes.c_char_p
    for name in ("kbit_quantize_blockwise_8bit", "kbit_dequantize_blockwise_8bit"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    for name in ("kbit_quantize_4bit", "kbit_dequantize_4bit"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    return lib


KBIT_QUANT = {"fp4": 0, "nf4": 1}


def kbit_quantize_4bit(lib, A: torch.Tensor, quant_type: str, bs: int):
    n = A.numel()
    out = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)
    st = lib.kbit_quantize_4bit(KBIT_DTYPES[A.dtype], KBIT_QUANT[quant_type], A.data_ptr(), out.data_ptr(),
                                absmax.data_ptr(), n, bs, None)
    assert st == 0, lib.kbit_status_string(st)
    return out, absmax


def kbit_dequantize_4bit(lib, packed: torch.Tensor, absmax: torch.Tensor, n: int, quant_type: str, bs: int, dtype):
    out = torch.empty(n, dtype=dtype)
    st = lib.kbit_dequantize_4bit(KBIT_DTYPES[dtype], KBIT_QUANT[quant_type], packed.data_ptr(), absmax.data_ptr(),
                                  out.data_ptr(), n, bs, None)
    assert st == 0, lib.kbit_status_string(st)
    return out


def check_4bit(lib) -> int:
    failures = 0
    torch.manual_seed(1)
    for quant_type in KBIT_QUANT:
        for dtype in KBIT_DTYPES:
            for bs in (32, *BLOCKSIZES):
                for n in (1, bs - 1, bs, 3 * bs + 7, 50 * bs + bs // 2 + 1, 1 << 16):
                    A = (torch.randn(n) * torch.rand(n).pow(3) * 10).to(dtype)
                    p_ref, st_ref = F.quantize_4bit(A, blocksize=bs, quant_type=quant_type)
                    p, am = kbit_quantize_4bit(lib, A, quant_type, bs)
                    dq_ref = F.dequantize_4bit(p_ref, st_ref).reshape(-1)
                    dq = kbit_dequantize_4bit(lib, p, am, n, quant_type, bs, dtype)
                    if not (torch.equal(p, p_ref) and torch.equal(am, st_ref.absmax) and torch.equal(dq, dq_ref)):
                        failures += 1
                        print(f"MISMATCH 4-bit {quant_type} {dtype} bs={bs} n={n}: codes {(p != p_ref).sum().item()} "
                              f"absmax {(am != st_ref.absmax).sum().item()} dequant {(dq != dq_ref).sum().item()}")
    return failures


def kbit_quantize(lib, A: torch.Tensor, code: torch.Tensor, bs: int):
    n = A.numel()
    out = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)
    st = lib.kbit_quantize_blockwise_8bit(KBIT_DTYPES[A.dtype], A.data_ptr(), code.data_ptr(), out.data_ptr(),
                                          absmax.data_ptr(), n, bs, None)
    assert st == 0, lib.kbit_status_string(st)
    return out, absmax


def kbit_dequantize(lib, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, bs: int, dtype):
    out = torch.empty(q.numel(), dtype=dtype)
    st = lib.kbit_dequantize_blockwise_8bit(KBIT_DTYPES[dtype], q.data_ptr(), code.data_ptr(), absmax.data_ptr(),
                                            out.data_ptr(), q.numel(), bs, None)
    assert st == 0, lib.kbit_status_string(st)
    return out


def bnb_quantize(A, code, bs):
    q, state = F.quantize_blockwise(A, code=code, blocksize=bs)
    return q.reshape(-1), state.absmax


def bnb_dequantize(q, absmax, code, bs, dtype):
    return torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, bs, dtype).reshape(-1)


def check_equality(lib, code) -> int:
    failures = 0
    torch.manual_seed(0)
    for dtype in KBIT_DTYPES:
        for bs in BLOCKSIZES:
            for n in (1, bs - 1, bs, 3 * bs + 7, 50 * bs + bs // 2 + 1, 1 << 16):
                # scaled so blocks have different absmax and values near every code
                A = (torch.randn(n) * torch.rand(n).pow(3) * 10).to(dtype)
                q_ref, am_ref = bnb_quantize(A, code, bs)
                q, am = kbit_quantize(lib, A, code, bs)
                dq_ref = bnb_dequantize(q_ref, am_ref, code, bs, dtype)
                dq = kbit_dequantize(lib, q, am, code, bs, dtype)
                ok = (torch.equal(q, q_ref) and torch.equal(am, am_ref)
                      and torch.equal(dq.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                      dq_ref.view(torch.int16 if dtype != torch.float32 else torch.int32)))
                if not ok:
                    failures += 1
                    print(f"MISMATCH {dtype} bs={bs} n={n}: codes {(q != q_ref).sum().item()} "
                          f"absmax {(am != am_ref).sum().item()} dequant {(dq != dq_ref).sum().item()}")
    return failures


def check_edges(lib, code) -> int:
    failures = 0
    A = torch.zeros(192)
    A[64:68] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    A[70] = float("nan")
    A[128:132] = torch.tensor([float("inf"), 1.0, -1.0, 0.0])
    for bs in (64,):
        q_ref, am_ref = bnb_quantize(A, code, bs)
        q, am = kbit_quantize(lib, A, code, bs)
        same = torch.equal(q, q_ref) and torch.equal(am, am_ref)
        print(f"edges (zero block, NaN, inf): codes equal={torch.equal(q, q_ref)} absmax equal={torch.equal(am, am_ref)}"
              f" zero-block code={q[0].item()} nan code={q[70].item()}")
        failures += not same
    # argument validation
    u8 = torch.empty(64, dtype=torch.uint8)
    f = torch.empty(64)
    cases = {
        "dtype 7": (7, f.data_ptr(), code.data_ptr(), u8.data_ptr(), f.data_ptr(), 64, 64, 2),
        "blocksize 96": (0, f.data_ptr(), code.data_ptr(), u8.data_ptr(), f.data_ptr(), 64, 96, 3),
        "blocksize 8192": (0, f.data_ptr(), code.data_ptr(), u8.data_ptr(), f.data_ptr(), 64, 8192, 3),
        "blocksize 32": (0, f.data_ptr(), code.data_ptr(), u8.data_ptr(), f.data_ptr(), 64, 32, 3),
        "n -1": (0, f.data_ptr(), code.data_ptr(), u8.data_ptr(), f.data_ptr(), -1, 64, 1),
        "NULL A": (0, None, code.data_ptr(), u8.data_ptr(), f.data_ptr(), 64, 64, 1),
        "NULL code": (0, f.data_ptr(), None, u8.data_ptr(), f.data_ptr(), 64, 64, 1),
        "n 0, NULLs": (0, None, None, None, None, 0, 64, 0),
    }
    for name, (*args, want) in cases.items():
        for fn in (lib.kbit_quantize_blockwise_8bit, lib.kbit_dequantize_blockwise_8bit):
            got = fn(*args, None)
            if got != want:
                failures += 1
                print(f"VALIDATION {fn.__name__} {name}: got {got}, want {want}")
    return failures


def best_of(fn, reps=5) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timing(lib, code) -> None:
    n, bs = 1 << 22, 4096
    A = torch.randn(n)
    q, am = kbit_quantize(lib, A, code, bs)
    tq_bnb = best_of(lambda: F.quantize_blockwise(A, code=code, blocksize=bs))
    tq = best_of(lambda: kbit_quantize(lib, A, code, bs))
    td_bnb = best_of(lambda: bnb_dequantize(q, am, code, bs, torch.float32))
    td = best_of(lambda: kbit_dequantize(lib, q, am, code, bs, torch.float32))
    print(f"timing 2^22 fp32 bs={bs} (best of 5; torch threads {torch.get_num_threads()}):")
    print(f"  quantize   bnb {tq_bnb * 1e3:8.2f} ms  kbit {tq * 1e3:8.2f} ms  speedup {tq_bnb / tq:5.2f}x")
    print(f"  dequantize bnb {td_bnb * 1e3:8.2f} ms  kbit {td * 1e3:8.2f} ms  speedup {td_bnb / td:5.2f}x")


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/kb-cpu/libkbit_cpu.so"
    lib = load(path)
    print(lib.kbit_build_info().decode())
    code = F.create_dynamic_map(signed=True).float().contiguous()
    failures = check_equality(lib, code) + check_edges(lib, code) + check_4bit(lib)
    print("oracle equality:", "OK" if failures == 0 else f"{failures} FAILURES")
    timing(lib, code)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
