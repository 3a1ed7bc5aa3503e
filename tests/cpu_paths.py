"""Which kernel the CPU library must dispatch to, derived from this CPU's flags (/proc/cpuinfo) and
KBIT_CPU_SIMD, independently of the library, as kbit.h's kbit_last_path() documents it: the tests
compare it with what the library says it ran. (cpu_features.h's rules: AVX2 needs the avx and avx2
flags; "AVX2 + FMA" also fma; AVX-512 needs avx512f, avx512bw and avx512vl with AVX2 + FMA; the
bfloat16 matmul kernels also avx512_bf16, the tiled one's fastest also avx512vbmi (which KBIT_CPU_SIMD=avx512
leaves out). The kernel reads CPUID and XGETBV itself; Linux's flags
already leave out what the OS does not enable.)"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Optional

__all__ = ["Cpu", "expected_path", "host_cpu"]


@dataclass(frozen=True)
class Cpu:
    flags: frozenset[str]
    x86: bool = True

    def level(self, simd: Optional[str]) -> int:
        """The SIMD level of kbit's dispatch (0 portable, 1 AVX2 + FMA, 2 AVX-512) KBIT_CPU_SIMD allows
        ("avx512" allows AVX-512 without VBMI)."""
        cap = {"0": 0, "avx2": 1}.get(simd or "", 2)
        if not self.x86 or not self.avx2(fma=True):
            return 0
        if cap >= 2 and {"avx512f", "avx512bw", "avx512vl"} <= self.flags:
            return 2
        return min(cap, 1)

    def avx2(self, fma: bool) -> bool:
        return self.x86 and {"avx", "avx2", *(("fma",) if fma else ())} <= self.flags


def host_cpu() -> Cpu:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return Cpu(frozenset(flags), platform.machine() in ("x86_64", "AMD64"))


def expected_path(cpu: Cpu, entry: str, simd: Optional[str] = None, *, n: int = 0, bf16: bool = False,
                  m_rows: int = 0, k_in: int = 0, blocksize: int = 1) -> str:
    """kbit_last_path() after a call of kbit_<entry> (simd: KBIT_CPU_SIMD's value, None unset)."""
    level = cpu.level(simd)
    avx2 = simd != "0" and cpu.avx2(fma=False)
    if entry == "quantize_blockwise_8bit":
        path = "avx2" if avx2 and n >= 16384 else "portable"
    elif entry == "dequantize_blockwise_8bit":
        path = "avx512" if level >= 2 else "portable"
    elif entry in ("quantize_4bit", "dequantize_4bit"):
        path = "avx2" if avx2 else "portable"
    elif entry == "gemv_4bit":
        path = "avx2" if level >= 1 else "portable"
    elif entry == "matmul_4bit":
        if level >= 2:
            use_bf16 = bf16 and "avx512_bf16" in cpu.flags
            path = "avx512bf16" if use_bf16 else "avx512"
            if k_in % blocksize == 0 and m_rows <= 4 and (not use_bf16 or k_in % 64 == 0):
                path += "-direct"
        else:
            path = "avx2" if level >= 1 else "portable"
    elif entry == "matmul_4bit_tiled":
        if level >= 2 and bf16 and "avx512_bf16" in cpu.flags:
            path = "avx512bf16-vbmi" if "avx512vbmi" in cpu.flags and simd != "avx512" else "avx512bf16"
        else:
            path = ("portable", "avx2", "avx512")[level]
    elif entry in ("adam_8bit_blockwise", "repack_4bit_tiled"):
        path = "portable"
    else:
        raise ValueError(f"no dispatch rule for kbit_{entry}")
    return f"kbit_{entry}:{path}"


def simd_env() -> Optional[str]:
    return os.environ.get("KBIT_CPU_SIMD")
