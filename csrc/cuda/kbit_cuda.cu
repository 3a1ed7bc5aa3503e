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
#include "kbit_math.h"

namespace kbit {
namespace {

const int kQuantizeThreads = 256; /* a quant block of up to 4096 values: <= 16 values per thread */
const int kMaxValuesPerThread = KBIT_BLOCKWISE8_MAX_BLOCKSIZE / kQuantizeThreads;
const int kDequantizeThreads = 256;

template <int DTYPE>
__device__ __forceinline__ float load_value(const void* p, int64_t i) {
  if (DTYPE == KBIT_DTYPE_F32) return static_cast<const float*>(p)[i];
  if (DTYPE == KBIT_DTYPE_F16) return kbit_f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return kbit_bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <int DTYPE>
__device__ __forceinline__ void store_value(void* p, int64_t i, float v) {
  if (DTYPE == KBIT_DTYPE_F32) {
    static_cast<float*>(p)[i] = v;
  } else if (DTYPE == KBIT_DTYPE_F16) {
    static_cast<uint16_t*>(p)[i] = kbit_f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = kbit_f32_to_bf16(v);
  }
}

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
      v[k] = i < len ? load_value<DTYPE>(A, start + i) : 0.0f;
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
    store_value<DTYPE>(out, i, kbit_dequantize_value(s_code, codes[i], absmax[i >> blocksize_log2]));
}

int64_t grid_size(int64_t work_items, int64_t cap) { return work_items < cap ? work_items : cap; }

/* Grid cap: enough blocks to fill any current GPU several times over; grid-stride loops do the rest. */
const int64_t kMaxGrid = 65535;

int launch_status() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? KBIT_OK : KBIT_STATUS_CUDA_BASE + (int)err;
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" {

KBIT_API int kbit_abi_version(void) { return KBIT_ABI_VERSION; }

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
  /* Clear an earlier, unrelated sticky-free error so it is not reported as ours. */
  (void)cudaGetLastError();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t blocks = (n + blocksize - 1) / blocksize;
  dim3 grid((unsigned)grid_size(blocks, kMaxGrid));
  switch (dtype) {
    case KBIT_DTYPE_F32:
      quantize_blockwise8_kernel<KBIT_DTYPE_F32><<<grid, kQuantizeThreads, 0, s>>>(A, code, out, absmax, n, blocksize, blocks);
      break;
    case KBIT_DTYPE_F16:
      quantize_blockwise8_kernel<KBIT_DTYPE_F16><<<grid, kQuantizeThreads, 0, s>>>(A, code, out, absmax, n, blocksize, blocks);
      break;
    default:
      quantize_blockwise8_kernel<KBIT_DTYPE_BF16><<<grid, kQuantizeThreads, 0, s>>>(A, code, out, absmax, n, blocksize, blocks);
      break;
  }
  return launch_status();
}

KBIT_API int kbit_dequantize_blockwise_8bit(int dtype, const uint8_t* codes, const float* code, const float* absmax,
                                            void* out, int64_t n, int32_t blocksize, void* stream) {
  int status = check_blockwise8(dtype, out, code, codes, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  (void)cudaGetLastError();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t log2_bs = log2_pow2(blocksize);
  dim3 grid((unsigned)grid_size((n + kDequantizeThreads - 1) / kDequantizeThreads, kMaxGrid));
  switch (dtype) {
    case KBIT_DTYPE_F32:
      dequantize_blockwise8_kernel<KBIT_DTYPE_F32><<<grid, kDequantizeThreads, 0, s>>>(codes, code, absmax, out, n, log2_bs);
      break;
    case KBIT_DTYPE_F16:
      dequantize_blockwise8_kernel<KBIT_DTYPE_F16><<<grid, kDequantizeThreads, 0, s>>>(codes, code, absmax, out, n, log2_bs);
      break;
    default:
      dequantize_blockwise8_kernel<KBIT_DTYPE_BF16><<<grid, kDequantizeThreads, 0, s>>>(codes, code, absmax, out, n, log2_bs);
      break;
  }
  return launch_status();
}

}  // extern "C"
