/*
 * Device-side load/store of kbit's element types and the launch/status helpers of every CUDA entry
 * point (kbit_cuda.cu, gemv.cu, adam.cu).
 */
#ifndef KBIT_CUDA_KBIT_CUDA_UTIL_CUH_
#define KBIT_CUDA_KBIT_CUDA_UTIL_CUH_

#include <cuda_runtime.h>

#include "kbit.h"
#include "kbit_math.h"

namespace kbit {
namespace cuda_util {

template <int DTYPE>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if (DTYPE == KBIT_DTYPE_F32) return static_cast<const float*>(p)[i];
  if (DTYPE == KBIT_DTYPE_F16) return kbit_f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return kbit_bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <int DTYPE>
__device__ __forceinline__ void store(void* p, int64_t i, float v) {
  if (DTYPE == KBIT_DTYPE_F32) {
    static_cast<float*>(p)[i] = v;
  } else if (DTYPE == KBIT_DTYPE_F16) {
    static_cast<uint16_t*>(p)[i] = kbit_f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = kbit_f32_to_bf16(v);
  }
}

/* Grid cap: enough blocks to fill any current GPU several times over; grid-stride loops do the rest
 * (and gridDim.x never overflows, whatever the element count). */
const int64_t kMaxGrid = 65535;

inline unsigned grid_for(int64_t work_items) {
  return (unsigned)(work_items < 1 ? 1 : (work_items < kMaxGrid ? work_items : kMaxGrid));
}

template <int D>
struct DtypeTag {
  static constexpr int value = D;
};

/* Clears an earlier, unrelated error, calls launch(DtypeTag<dtype>{}) with the element type as a
 * compile-time constant (dtype already checked), then returns the launch's status. */
template <typename Launch>
int launch_for_dtype(int dtype, Launch launch) {
  (void)cudaGetLastError();
  switch (dtype) {
    case KBIT_DTYPE_F32: launch(DtypeTag<KBIT_DTYPE_F32>{}); break;
    case KBIT_DTYPE_F16: launch(DtypeTag<KBIT_DTYPE_F16>{}); break;
    default: launch(DtypeTag<KBIT_DTYPE_BF16>{}); break;
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? KBIT_OK : KBIT_STATUS_CUDA_BASE + (int)err;
}

}  // namespace cuda_util
}  // namespace kbit

#endif /* KBIT_CUDA_KBIT_CUDA_UTIL_CUH_ */
