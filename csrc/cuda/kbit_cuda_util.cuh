/*
 * Device-side load/store of kbit's element types and the launch/status helpers of every CUDA entry
 * point (kbit_cuda.cu, gemv.cu, adam.cu): every kernel is launched through cuda_util::launch.
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

/* p + i elements of DTYPE. */
template <int DTYPE>
__device__ __forceinline__ const void* offset(const void* p, int64_t i) {
  return static_cast<const char*>(p) + i * (DTYPE == KBIT_DTYPE_F32 ? 4 : 2);
}

template <int DTYPE>
__device__ __forceinline__ void* offset(void* p, int64_t i) {
  return static_cast<char*>(p) + i * (DTYPE == KBIT_DTYPE_F32 ? 4 : 2);
}

/* Grid cap: enough blocks to fill any current GPU several times over; grid-stride loops do the rest
 * (and gridDim.x never overflows, whatever the element count). */
const int64_t kMaxGrid = 65535;

inline unsigned grid_for(int64_t work_items) {
#if defined(KBIT_CUDA_EMULATION)
  /* The test harness lowers the cap (e.g. to 1 or 3 blocks) to exercise the grid-stride loops. */
  const int64_t cap = kbit_emu::grid_cap() < kMaxGrid ? kbit_emu::grid_cap() : kMaxGrid;
#else
  const int64_t cap = kMaxGrid;
#endif
  return (unsigned)(work_items < 1 ? 1 : (work_items < cap ? work_items : cap));
}

/* The one kernel launch of the library: Kernel<<<grid, block, 0, stream>>>(args...), no dynamic
 * shared memory. Built by the CUDA execution harness (tests/cuda_emu, KBIT_CUDA_EMULATION), the
 * harness runs the kernel's blocks and threads on the host instead. */
template <auto Kernel, typename... Args>
inline void launch(dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#if defined(KBIT_CUDA_EMULATION)
  (void)stream;
  kbit_emu::launch(kbit_emu::kernel_name(__PRETTY_FUNCTION__), grid, block, [&] { Kernel(args...); });
#else
  Kernel<<<grid, block, 0, stream>>>(args...);
#endif
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
