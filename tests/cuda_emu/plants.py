"""Planted bugs: copies of the real CUDA sources with one mistake each, built into emulated libraries,
which the harness must fail on (tests/test_cuda_emulation.py; tests/test_gpu_check.py uses one to show
that tests/gpu_check.py reports a failing kernel)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from . import build as emu_build

__all__ = ["PLANTS", "Plant", "planted_library"]


@dataclasses.dataclass(frozen=True)
class Plant:
    """A copy of the real sources with `old` replaced by `new` in csrc/cuda/`file` (exactly once)."""

    id: str
    file: str
    old: str
    new: str
    spec: str  # the id of the SPECS entry whose call runs on the planted copy
    expect: str  # a regular expression the harness's failure must match
    sanitize: bool = False


PLANTS = [
    Plant("removed-barrier", "kbit_cuda.cu",
          "  if (lane == 0) warp_max[warp] = v;\n  __syncthreads();\n  if (warp == 0) {\n    v = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0.0f;",
          "  if (lane == 0) warp_max[warp] = v;\n  if (warp == 0) {\n    v = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0.0f;",
          "quantize_8bit-f32-bs256-n549", r"differ"),
    Plant("shared-buffer-reused-without-barrier", "kbit_cuda.cu",
          "  v = warp_max[0];\n  __syncthreads(); /* warp_max is reused by the next quant block */\n  return v;\n}\n\n/* One CUDA",
          "  v = warp_max[0];\n  return v;\n}\n\n/* One CUDA",
          "quantize_8bit-f16-bs64-n165", r"differ"),
    Plant("wrong-shuffle-mask", "gemv.cu",
          "acc += __shfl_xor_sync(0xffffffffu, acc, offset);",
          "acc += __shfl_xor_sync(0x7fffffffu, acc, offset);",
          "gemv_4bit-f32-nf4-5x64-bs64-words",
          # in order, lanes 0..30 complete the shuffle and lane 15 reads lane 31; else lane 31 arrives first
          r"kernel kbit::\{anonymous\}::gemv4_kernel<0, true>, block \(0,0,0\), thread \((15|31),0,0\): "
          r"__shfl_xor_sync\(mask 0x7fffffff\) at csrc/cuda/gemv.cu:\d+ "
          r"(does not name the calling lane 31|reads lane 31, which the mask does not name)"),
    Plant("barrier-in-divergent-code", "adam.cu",
          "    s[1][warp] = b;\n  }\n  __syncthreads();",
          "    s[1][warp] = b;\n    __syncthreads();\n  }\n  __syncthreads();",
          "adam_step1-adam-f32-n1000",
          r"kernel kbit::\{anonymous\}::adam8_kernel<0>, block \(0,0,0\), thread \(\d+,0,0\): __syncthreads\(\) at "
          r"csrc/cuda/adam.cu:\d+, but thread \(\d+,0,0\) waits at __syncthreads\(\) at csrc/cuda/adam.cu:\d+ "
          r"\(a barrier in divergent code\)"),
    Plant("barrier-after-early-exit", "gemv.cu",
          "  if (threadIdx.x < KBIT_CODEBOOK4_SIZE) s_code[threadIdx.x] = kbit_code4_value(quant_type, threadIdx.x);\n  __syncthreads();",
          "  if (threadIdx.x < KBIT_CODEBOOK4_SIZE) s_code[threadIdx.x] = kbit_code4_value(quant_type, threadIdx.x);\n  if (threadIdx.x >= 64) return;\n  __syncthreads();",
          "gemv_4bit-bf16-fp4-3x33-bs32-bytes",
          r"gemv4_kernel<2, false>, block \(0,0,0\), thread \(0,0,0\): __syncthreads\(\) at csrc/cuda/gemv.cu:\d+ "
          r"is not reached by every thread of the block: thread \(64,0,0\) has exited"),
    Plant("shuffle-reads-a-lane-outside-the-mask", "kbit_cuda.cu",
          "  for (int offset = 16; offset > 0; offset >>= 1) v = max_ignore_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));\n  int warp",
          "  for (int offset = 16; offset > 0; offset >>= 1) v = max_ignore_nan(v, lane_half(v, offset));\n  int warp",
          "quantize_8bit-bf16-bs128-n293",
          r"quantize_blockwise8_kernel<2>, block \(\d+,0,0\), thread \(\d+,0,0\): __shfl_xor_sync\(mask 0x0000ffff\) at "
          r"csrc/cuda/kbit_cuda.cu:\d+ reads lane \d+, which the mask does not name"),
    Plant("read-past-the-input", "kbit_cuda.cu",
          "        v[k][h] = i + h < len ? cuda_util::load<DTYPE>(A, start + i + h) : 0.0f;",
          "        v[k][h] = i + h <= len ? cuda_util::load<DTYPE>(A, start + i + h) : 0.0f;",
          "quantize_4bit-nf4-f32-bs64-n165",
          r"(?s)ERROR: AddressSanitizer: heap-buffer-overflow.*READ of size 4.*quantize4_kernel<0>", sanitize=True),
    Plant("write-past-the-output", "kbit_cuda.cu",
          "    if (i + 1 < n) cuda_util::store<DTYPE>(out, i + 1,",
          "    if (i + 1 <= n) cuda_util::store<DTYPE>(out, i + 1,",
          "dequantize_4bit-fp4-f16-bs32-n101",
          r"(?s)ERROR: AddressSanitizer: heap-buffer-overflow.*WRITE of size 2.*dequantize4_kernel<1>", sanitize=True),
    Plant("index-past-a-shared-array", "gemv.cu",
          "  if (threadIdx.x < KBIT_CODEBOOK4_SIZE) s_code[threadIdx.x]",
          "  if (threadIdx.x <= KBIT_CODEBOOK4_SIZE) s_code[threadIdx.x]",
          "gemv_4bit-f16-nf4-5x64-bs64-words",
          # UndefinedBehaviorSanitizer's bounds check fires first; AddressSanitizer's red zone would next
          r"(?s)(gemv.cu:\d+:\d+: runtime error: index 16 out of bounds for type 'float \[16\]'"
          r"|AddressSanitizer: global-buffer-overflow.*s_code).*gemv4_kernel<1, true>", sanitize=True),
]

# The lane_half helper the shuffle plant calls: a shuffle among the low 16 lanes whose xor partner
# can be a high lane (offset 16).
_LANE_HALF = ("__device__ __forceinline__ float lane_half(float v, int offset) {\n"
              "  return __shfl_xor_sync(0x0000ffffu, v, offset);\n}\n\n")


def planted_library(plant: Plant, tmp: Path) -> Path:
    """The emulated library of a copy of csrc/ (under tmp) with the plant applied."""
    root = tmp / "src"
    shutil.copytree(emu_build.REPO / "csrc", root / "csrc")
    path = root / "csrc" / "cuda" / plant.file
    text = path.read_text()
    assert text.count(plant.old) == 1, f"{plant.id}: the code to mutate is no longer in {plant.file}: update the plant"
    text = text.replace(plant.old, plant.new)
    if "lane_half(" in plant.new:
        text = text.replace("/* NaN-ignoring max", _LANE_HALF + "/* NaN-ignoring max", 1)
    path.write_text(text)
    return emu_build.build(sanitize=plant.sanitize, root=root)
