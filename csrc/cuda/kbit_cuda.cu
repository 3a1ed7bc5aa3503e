/*
 * libkbit_cuda{MAJOR}{MINOR}.so: the kbit C ABI on device memory.
 *
 * The kernels only orchestrate: load values, reduce absmax per quantization block (warp shuffles,
 * then one value per warp through shared memory), and store. The per-value math is kbit_math.h,
 * the same code libkbit_cpu.so runs, so CPU tests pin down the GPU's codes.
 */
#include <cuda_runtime.h>

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_cuda_util.cuh"
#include "kbit_math.h"

namespace kbit {
namespace {

const int kQuantizeThreads = 256; /* a quant block of up to 4096 values: <= 16 values per thread */
const int kMaxValuesPerThread = KBIT_BLOCKWISE8_MAX_BLOCKSIZE / kQuantizeThreads;
const int kDequantizeThreads = 256;

/* NaN-ignoring max, as on the CPU (`v > m` is false for NaN). */
__device__ __forceinline__ float max_ignore_nan(float m, float v) { return v > m ? v : m; }

__device__ float block_max(float v, float* warp_max) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_ignore_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v = max_ignore_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) warp_max[0] = v;
  }
  __syncthreads();
  v = warp_max[0];
  __syncthreads(); /* warp_max is reused by the next quant block */
  return v;
}

/* One CUDA block per quantization block (grid-stride over blocks). */
template <int DTYPE>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_blockwise8_kernel(const void* __restrict__ A, const float* __restrict__ code, uint8_t* __restrict__ out,
                               float* __restrict__ absmax, int64_t n, int32_t blocksize, int64_t num_blocks) {
  __shared__ float s_code[KBIT_CODEBOOK8_SIZE];
  __shared__ float s_warp_max[kQuantizeThreads / 32];
  for (int k = threadIdx.x; k < KBIT_CODEBOOK8_SIZE; k += blockDim.x) s_code[k] = code[k];
  __syncthreads();
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    int64_t start = b * blocksize;
    int64_t len = n - start < blocksize ? n - start : blocksize;
    float v[kMaxValuesPerThread];
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxValuesPerThread; ++k) {
      int64_t i = threadIdx.x + (int64_t)k * kQuantizeThreads;
      v[k] = i < len ? cuda_util::load<DTYPE>(A, start + i) : 0.0f;
      m = max_ignore_nan(m, fabsf(v[k]));
    }
    m = block_max(m, s_warp_max);
    if (threadIdx.x == 0) absmax[b] = m;
#pragma unroll
    for (int k = 0; k < kMaxValuesPerThread; ++k) {
      int64_t i = threadIdx.x + (int64_t)k * kQuantizeThreads;
      if (i < len) out[start + i] = kbit_quantize_value(s_code, v[k], m);
    }
  }
}

template <int DTYPE>
__global__ void __launch_bounds__(kDequantizeThreads)
    dequantize_blockwise8_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ code,
                                 const float* __restrict__ absmax, void* __restrict__ out, int64_t n,
                                 int32_t blocksize_log2) {
  __shared__ float s_code[KBIT_CODEBOOK8_SIZE];
  for (int k = threadIdx.x; k < KBIT_CODEBOOK8_SIZE; k += blockDim.x) s_code[k] = code[k];
  __syncthreads();
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    cuda_util::store<DTYPE>(out, i, kbit_dequantize_value(s_code, codes[i], absmax[i >> blocksize_log2]));
}

/* ---- 4-bit ---- */

const int kQuantize4MaxThreads = 256;
/* Each thread owns pairs of values (one output byte); a block of 4096 values is 2048 pairs. */
const int kMaxPairsPerThread = KBIT_BLOCKWISE4_MAX_BLOCKSIZE / 2 / kQuantize4MaxThreads;
const int kDequantize4Threads = 256;

/* max |v| over the CUDA block, NaN propagating (as on the CPU: an integer max of the bits). */
__device__ uint32_t block_max_bits(uint32_t v, uint32_t* warp_max) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    uint32_t o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0u;
    for (int offset = 16; offset > 0; offset >>= 1) {
      uint32_t o = __shfl_xor_sync(0xffffffffu, v, offset);
      v = o > v ? o : v;
    }
    if (lane == 0) warp_max[0] = v;
  }
  __syncthreads();
  v = warp_max[0];
  __syncthreads();
  return v;
}

/* One CUDA block per quantization block (grid-stride); blockDim.x = clamp(blocksize / 2, 32, 256). */
template <int DTYPE>
__global__ void __launch_bounds__(kQuantize4MaxThreads)
    quantize4_kernel(const void* __restrict__ A, int quant_type, uint8_t* __restrict__ out, float* __restrict__ absmax,
                     int64_t n, int32_t blocksize, int64_t num_blocks) {
  __shared__ uint32_t s_warp_max[kQuantize4MaxThreads / 32];
  float bounds[15];
  int32_t deltas[15];
#pragma unroll
  for (int k = 0; k < 15; ++k) {
    bounds[k] = kbit_bound4(quant_type, k);
    deltas[k] = kbit_code4_delta(quant_type, k);
  }
  const int32_t base = kbit_code4_base(quant_type);
  const float zero_pad = 0.0f;
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    int64_t start = b * blocksize;
    int64_t len = n - start < blocksize ? n - start : blocksize;
    bool partial = len < blocksize;
    float v[kMaxPairsPerThread][2];
    uint32_t mbits = 0;
#pragma unroll
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      int64_t i = 2 * (threadIdx.x + (int64_t)k * blockDim.x);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        v[k][h] = i + h < len ? cuda_util::load<DTYPE>(A, start + i + h) : 0.0f;
        uint32_t u = kbit_f32_bits(v[k][h]) & 0x7fffffffu;
        mbits = u > mbits ? u : mbits;
      }
    }
    float m = kbit_bits_f32(block_max_bits(mbits, s_warp_max));
    float scale = kbit_absmax4_scale(m);
    if (threadIdx.x == 0) absmax[b] = partial ? scale : m;
    float inv = 1.0f / scale;
#pragma unroll
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      int64_t i = 2 * (threadIdx.x + (int64_t)k * blockDim.x);
      if (i < len) {
        int32_t c[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float x = i + h < len ? (partial ? kbit_normalize(v[k][h], scale) : kbit_normalize4_full(v[k][h], inv))
                                : zero_pad;
          c[h] = kbit_quantize4_code(bounds, deltas, base, x);
        }
        out[(start + i) / 2] = kbit_pack4((uint8_t)c[0], (uint8_t)c[1]);
      }
    }
  }
}

/* One thread per output byte (two values). */
template <int DTYPE>
__global__ void __launch_bounds__(kDequantize4Threads)
    dequantize4_kernel(const uint8_t* __restrict__ packed, int quant_type, const float* __restrict__ absmax,
                       void* __restrict__ out, int64_t n, int32_t blocksize_log2) {
  __shared__ float s_code[16];
  if (threadIdx.x < 16) s_code[threadIdx.x] = kbit_code4_value(quant_type, threadIdx.x);
  __syncthreads();
  int64_t bytes = (n + 1) / 2;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < bytes; j += stride) {
    uint8_t v = packed[j];
    int64_t i = 2 * j;
    float m = absmax[i >> blocksize_log2]; /* blocksize is even: both values share a block */
    cuda_util::store<DTYPE>(out, i, kbit_dequantize4_value(s_code, kbit_unpack4_first(v), m));
    if (i + 1 < n) cuda_util::store<DTYPE>(out, i + 1, kbit_dequantize4_value(s_code, kbit_unpack4_second(v), m));
  }
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" {

KBIT_API int kbit_abi_version(void) { return KBIT_ABI_VERSION; }

/* The CUDA library records no kernel path (kbit.h). */
KBIT_API const char* kbit_last_path(void) { return ""; }

/* The tiled layout is the CPU's (kbit.h): every library exports it, the CUDA ones refuse it. */
KBIT_API kbit_status kbit_repack_4bit_tiled(const uint8_t*, const float*, uint8_t*, float*, int64_t, int64_t,
                                            int32_t) {
  return KBIT_ERR_NOT_IN_THIS_LIBRARY;
}

KBIT_API kbit_status kbit_matmul_4bit_tiled(int, int, const void*, const uint8_t*, const float*, const void*, void*,
                                            int64_t, int64_t, int64_t, int32_t, void*) {
  return KBIT_ERR_NOT_IN_THIS_LIBRARY;
}

KBIT_API const char* kbit_status_string(int status) {
  const char* s = kbit_own_status_string(status);
  if (s != NULL) return s;
  if (status >= KBIT_STATUS_CUDA_BASE) return cudaGetErrorString(static_cast<cudaError_t>(status - KBIT_STATUS_CUDA_BASE));
  return "unknown kbit status";
}

KBIT_API int kbit_quantize_blockwise_8bit(int dtype, const void* A, const float* code, uint8_t* out, float* absmax,
                                          int64_t n, int32_t blocksize, void* stream) {
  int status = check_blockwise8(dtype, A, code, out, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t blocks = (n + blocksize - 1) / blocksize;
  dim3 grid(cuda_util::grid_for(blocks));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    cuda_util::launch<quantize_blockwise8_kernel<decltype(tag)::value>>(grid, kQuantizeThreads, s, A, code, out, absmax,
                                                                          n, blocksize, blocks);
  });
}

KBIT_API int kbit_dequantize_blockwise_8bit(int dtype, const uint8_t* codes, const float* code, const float* absmax,
                                            void* out, int64_t n, int32_t blocksize, void* stream) {
  int status = check_blockwise8(dtype, out, code, codes, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t log2_bs = log2_pow2(blocksize);
  dim3 grid(cuda_util::grid_for((n + kDequantizeThreads - 1) / kDequantizeThreads));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    cuda_util::launch<dequantize_blockwise8_kernel<decltype(tag)::value>>(grid, kDequantizeThreads, s, codes, code, absmax,
                                                                            out, n, log2_bs);
  });
}

KBIT_API int kbit_quantize_4bit(int dtype, int quant_type, const void* A, uint8_t* out, float* absmax, int64_t n,
                                int32_t blocksize, void* stream) {
  int status = check_blockwise4(dtype, quant_type, A, out, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t blocks = (n + blocksize - 1) / blocksize;
  int threads = blocksize / 2 < 32 ? 32 : (blocksize / 2 > kQuantize4MaxThreads ? kQuantize4MaxThreads : blocksize / 2);
  dim3 grid(cuda_util::grid_for(blocks));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    cuda_util::launch<quantize4_kernel<decltype(tag)::value>>(grid, threads, s, A, quant_type, out, absmax, n, blocksize,
                                                                blocks);
  });
}

KBIT_API int kbit_dequantize_4bit(int dtype, int quant_type, const uint8_t* packed, const float* absmax, void* out,
                                  int64_t n, int32_t blocksize, void* stream) {
  int status = check_blockwise4(dtype, quant_type, out, packed, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t log2_bs = log2_pow2(blocksize);
  int64_t bytes = (n + 1) / 2;
  dim3 grid(cuda_util::grid_for((bytes + kDequantize4Threads - 1) / kDequantize4Threads));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    cuda_util::launch<dequantize4_kernel<decltype(tag)::value>>(grid, kDequantize4Threads, s, packed, quant_type, absmax,
                                                                  out, n, log2_bs);
  });
}

}  // extern "C"
