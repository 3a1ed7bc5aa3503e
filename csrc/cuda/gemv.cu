/*
 * kbit_gemv_4bit and kbit_matmul_4bit on the GPU: out = W' · A (+ bias) for a 4-bit (NF4/FP4)
 * weight and one row of A (or m_rows rows: blockIdx.y strides over them), never materializing W'.
 *
 * One warp per output row (kGemvWarps rows per CUDA block, grid-stride over rows, so any n_out
 * fits the grid). Lanes stride over the row's values; the warp's partial sums meet in a shuffle
 * reduction. When k_in is a multiple of 8 and `packed` is 4-byte aligned, every row starts on a
 * 4-byte word and 8 consecutive values share one quantization block (blocksize >= 32 is a multiple
 * of 8), so each lane reads whole words (8 codes, one absmax) and a warp reads 128 contiguous
 * bytes per step. Otherwise (odd k_in, blocks straddling rows at any offset) each lane reads the
 * byte and nibble of each value. W'[j][k] is kbit_dequantize4_value (codebook entry times absmax,
 * float32), accumulated in float32.
 */
#include <cuda_runtime.h>

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_cuda_util.cuh"
#include "kbit_math.h"

namespace kbit {
namespace {

const int kGemvWarps = 4;
const int kGemvThreads = 32 * kGemvWarps;

template <int DTYPE, bool WORDS>
__global__ void __launch_bounds__(kGemvThreads)
    gemv4_kernel(const void* __restrict__ A, int quant_type, const uint8_t* __restrict__ packed,
                 const float* __restrict__ absmax, const void* __restrict__ bias, void* __restrict__ out, int64_t m_rows,
                 int64_t n_out, int64_t k_in, int32_t log2_bs) {
  __shared__ float s_code[KBIT_CODEBOOK4_SIZE];
  if (threadIdx.x < KBIT_CODEBOOK4_SIZE) s_code[threadIdx.x] = kbit_code4_value(quant_type, threadIdx.x);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row_stride = (int64_t)gridDim.x * kGemvWarps;
  for (int64_t i = blockIdx.y; i < m_rows; i += gridDim.y) { /* rows of A */
    const void* __restrict__ A_i = cuda_util::offset<DTYPE>(A, i * k_in);
    void* __restrict__ out_i = cuda_util::offset<DTYPE>(out, i * n_out);
    for (int64_t j = (int64_t)blockIdx.x * kGemvWarps + warp; j < n_out; j += row_stride) {
      const int64_t start = j * k_in;
      float acc = 0.0f;
      if (WORDS) {
        const uint32_t* __restrict__ words = reinterpret_cast<const uint32_t*>(packed) + (start >> 3);
        const int64_t n_words = k_in >> 3;
        for (int64_t w = lane; w < n_words; w += 32) {
          uint32_t word = words[w];
          int64_t k = w << 3;
          float m = absmax[(start + k) >> log2_bs];
#pragma unroll
          for (int t = 0; t < 4; ++t) { /* byte t of the word (little endian) holds values k + 2t, k + 2t + 1 */
            uint8_t byte = (uint8_t)(word >> (8 * t));
            acc += cuda_util::load<DTYPE>(A_i, k + 2 * t) * kbit_dequantize4_value(s_code, kbit_unpack4_first(byte), m);
            acc += cuda_util::load<DTYPE>(A_i, k + 2 * t + 1) * kbit_dequantize4_value(s_code, kbit_unpack4_second(byte), m);
          }
        }
      } else {
        for (int64_t k = lane; k < k_in; k += 32) {
          int64_t pos = start + k;
          uint8_t byte = packed[pos >> 1];
          uint8_t c = (pos & 1) ? kbit_unpack4_second(byte) : kbit_unpack4_first(byte);
          acc += cuda_util::load<DTYPE>(A_i, k) * kbit_dequantize4_value(s_code, c, absmax[pos >> log2_bs]);
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (lane == 0) {
        if (bias != NULL) acc += cuda_util::load<DTYPE>(bias, j);
        cuda_util::store<DTYPE>(out_i, j, acc);
      }
    }
  }
}

}  // namespace
}  // namespace kbit

using namespace kbit;

namespace {

int launch_matmul4(int dtype, int quant_type, const void* A, const uint8_t* packed, const float* absmax,
                   const void* bias, void* out, int64_t m_rows, int64_t n_out, int64_t k_in, int32_t blocksize,
                   void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t log2_bs = log2_pow2(blocksize);
  bool words = k_in % 8 == 0 && (reinterpret_cast<uintptr_t>(packed) & 3u) == 0;
  dim3 grid(cuda_util::grid_for((n_out + kGemvWarps - 1) / kGemvWarps), (unsigned)(m_rows < 65535 ? m_rows : 65535));
  return cuda_util::launch_for_dtype(dtype, [&](auto tag) {
    constexpr int D = decltype(tag)::value;
    if (words) {
      cuda_util::launch<gemv4_kernel<D, true>>(grid, kGemvThreads, s, A, quant_type, packed, absmax, bias, out, m_rows,
                                              n_out, k_in, log2_bs);
    } else {
      cuda_util::launch<gemv4_kernel<D, false>>(grid, kGemvThreads, s, A, quant_type, packed, absmax, bias, out,
                                               m_rows, n_out, k_in, log2_bs);
    }
  });
}

}  // namespace

extern "C" KBIT_API int kbit_gemv_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                       const float* absmax, const void* bias, void* out, int64_t n_out, int64_t k_in,
                                       int32_t blocksize, void* stream) {
  int status = check_gemv4(dtype, quant_type, A, packed, absmax, out, n_out, k_in, blocksize);
  if (status != KBIT_OK || n_out == 0) return status;
  return launch_matmul4(dtype, quant_type, A, packed, absmax, bias, out, 1, n_out, k_in, blocksize, stream);
}

/* Each row of A reads the whole weight (from L2 for a few rows); for many rows the runtime
 * dequantizes once and uses cuBLAS instead. */
extern "C" KBIT_API int kbit_matmul_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                         const float* absmax, const void* bias, void* out, int64_t m_rows,
                                         int64_t n_out, int64_t k_in, int32_t blocksize, void* stream) {
  int status = check_matmul4(dtype, quant_type, A, packed, absmax, out, m_rows, n_out, k_in, blocksize);
  if (status != KBIT_OK || n_out == 0 || m_rows == 0) return status;
  return launch_matmul4(dtype, quant_type, A, packed, absmax, bias, out, m_rows, n_out, k_in, blocksize, stream);
}
