/*
 * kbit_adam_8bit_blockwise on the GPU: one step of 8-bit blockwise Adam/AdamW, in place.
 *
 * One CUDA block of KBIT_OPTIM8_BLOCKSIZE threads per block of the states (grid-stride over
 * blocks, so any n fits the grid), one value per thread: dequantize m and v, the step of
 * kbit_optim_math.h (the CPU library's arithmetic), p stored back, a block reduction of the new
 * absmax of both states (warp shuffles, then one value per warp through shared memory; a max of
 * |value| bits, so NaN propagates as on the CPU), and the nearest-entry search of each state in its
 * codebook (kbit_nearest_code, codebooks in shared memory). Every thread reads the old absmax before
 * the reduction's barriers and thread 0 writes the new one after them, so the update is in place.
 */
#include <cuda_runtime.h>

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_cuda_util.cuh"
#include "kbit_math.h"
#include "kbit_optim_math.h"

namespace kbit {
namespace {

const int kAdamThreads = KBIT_OPTIM8_BLOCKSIZE;
const int kAdamWarps = kAdamThreads / 32;

/* The max of a and b over the block, both at once; every thread gets the result. */
__device__ __forceinline__ void block_max2(uint32_t& a, uint32_t& b, uint32_t (*s)[kAdamWarps]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    uint32_t oa = __shfl_xor_sync(0xffffffffu, a, offset), ob = __shfl_xor_sync(0xffffffffu, b, offset);
    a = oa > a ? oa : a;
    b = ob > b ? ob : b;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    s[0][warp] = a;
    s[1][warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
#pragma unroll
  for (int w = 0; w < kAdamWarps; ++w) {
    a = s[0][w] > a ? s[0][w] : a;
    b = s[1][w] > b ? s[1][w] : b;
  }
  __syncthreads(); /* s is reused by the next block of states */
}

template <int DTYPE>
__global__ void __launch_bounds__(kAdamThreads)
    adam8_kernel(void* __restrict__ p, const void* __restrict__ g, uint8_t* __restrict__ state1,
                 uint8_t* __restrict__ state2, float* __restrict__ absmax1, float* __restrict__ absmax2,
                 const float* __restrict__ qmap1, const float* __restrict__ qmap2, KbitAdamParams q, int64_t n,
                 int64_t num_blocks) {
  __shared__ float s_q1[KBIT_CODEBOOK8_SIZE], s_q2[KBIT_CODEBOOK8_SIZE];
  __shared__ uint32_t s_max[2][kAdamWarps];
  for (int k = threadIdx.x; k < KBIT_CODEBOOK8_SIZE; k += blockDim.x) {
    s_q1[k] = qmap1[k];
    s_q2[k] = qmap2[k];
  }
  __syncthreads();
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t i = b * kAdamThreads + threadIdx.x;
    const bool valid = i < n;
    const float a1 = absmax1[b], a2 = absmax2[b];
    float m = 0.0f, v = 0.0f;
    if (valid) {
      float pv = cuda_util::load<DTYPE>(p, i);
      m = kbit_dequantize_value(s_q1, state1[i], a1);
      v = kbit_dequantize_value(s_q2, state2[i], a2);
      kbit_adam_update(&q, &pv, cuda_util::load<DTYPE>(g, i), &m, &v);
      cuda_util::store<DTYPE>(p, i, pv);
    }
    uint32_t mb = valid ? kbit_abs_bits(m) : 0u, vb = valid ? kbit_abs_bits(v) : 0u;
    block_max2(mb, vb, s_max);
    const float n1 = kbit_bits_f32(mb), n2 = kbit_bits_f32(vb);
    if (threadIdx.x == 0) {
      absmax1[b] = n1;
      absmax2[b] = n2;
    }
    if (valid) {
      state1[i] = kbit_optim_code(s_q1, kbit_optim_normalize(m, n1));
      state2[i] = kbit_optim_code(s_q2, kbit_optim_normalize(v, n2));
    }
  }
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" KBIT_API int kbit_adam_8bit_blockwise(int dtype, void* p, const void* g, uint8_t* state1, uint8_t* state2,
                                                 float* absmax1, float* absmax2, const float* qmap1,
                                                 const float* qmap2, float beta1, float beta2, float eps,
                                                 float weight_decay, float lr, int32_t step, float gnorm_scale,
                                                 int decoupled_weight_decay, int64_t n, void* stream) {
  KbitAdamParams q;
  int status = prepare_adam8(dtype, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, beta1, beta2, eps,
                             weight_decay, lr, step, gnorm_scale, decoupled_weight_decay, n, &q);
  if (status != KBIT_OK || n == 0) return status;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t blocks = (n + kAdamThreads - 1) / kAdamThreads;
  dim3 grid(cuda_util::grid_for(blocks));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    cuda_util::launch<adam8_kernel<decltype(tag)::value>>(grid, kAdamThreads, s, p, g, state1, state2, absmax1, absmax2,
                                                            qmap1, qmap2, q, n, blocks);
  });
}
