/*
 * Stand-ins for what kbit's CUDA sources use of CUDA, so that the host C++ compiler builds them into
 * libkbit_cuda_emu.so (tests/cuda_emu/build.py; never shipped). Found before any real cuda_runtime.h
 * by the include path of that build only.
 *
 * A kernel launch (kbit::cuda_util::launch) runs each CUDA block's threads as cooperative fibers
 * (runtime.cpp), the blocks one after another. A thread runs until it reaches a synchronization point
 * (__syncthreads, a warp intrinsic) or exits; the runtime then checks the point (every thread of the
 * block at the same __syncthreads; every lane a warp intrinsic's mask names at the same intrinsic with
 * the same mask) and fails the launch, naming the kernel, block and thread, when it does not hold.
 * Between synchronization points the threads run in the order of the configured schedule (in order,
 * reversed, seeded random), so a missing barrier or a shared-memory race changes the result under
 * some order.
 *
 * __shared__ variables are function-local statics: one copy per kernel, shared by the fibers of the
 * block that runs (blocks run one at a time, launches are serialized). AddressSanitizer puts red
 * zones around them (the kernels have internal linkage), so an index past a __shared__ array is a
 * reported global-buffer-overflow.
 */
#ifndef KBIT_CUDA_EMU_CUDA_RUNTIME_H_
#define KBIT_CUDA_EMU_CUDA_RUNTIME_H_

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#define KBIT_CUDA_EMULATION 1

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
/* __restrict__ is a GNU C++ keyword already. */

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

/* The values of the real enum, for the statuses the runtime gives. */
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t error);

namespace kbit_emu {

/* Where a synchronization point is in the source. */
struct Site {
  const char* file;
  int line;
};
#define KBIT_EMU_SITE (::kbit_emu::Site{__FILE__, __LINE__})

/* The running fiber's coordinates; the runtime sets them at every switch. */
struct Coordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Coordinates g_coordinates;

void syncthreads(Site site);

/* Warp intrinsics: each lane deposits `value` and waits until every lane of `mask` has arrived. */
enum WarpOp { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncwarp, kBallot, kAny, kAll };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site);

template <typename T>
T shfl(WarpOp op, unsigned mask, T var, int arg, Site site, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type of at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &var, sizeof var);
  bits = warp_op(op, mask, bits, arg, width, site);
  T out;
  memcpy(&out, &bits, sizeof out);
  return out;
}

/* Runs body(ctx) as every thread of every block of the grid under the configured schedule; a
 * violation fails the launch (cudaGetLastError) with a message naming kernel, block and thread. */
void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx);

/* The kernel's name from the __PRETTY_FUNCTION__ of cuda_util::launch<Kernel> ("Kernel = ..."). */
const char* kernel_name(const char* pretty_function);

/* The grid cap cuda_util::grid_for applies (kbit_emu_configure lowers it for tests). */
int64_t grid_cap(void);

template <typename Body>
void launch(const char* kernel, dim3 grid, dim3 block, Body body) {
  run_grid(kernel, grid, block, [](void* ctx) { (*static_cast<Body*>(ctx))(); }, &body);
}

}  // namespace kbit_emu

#define threadIdx (static_cast<const uint3&>(::kbit_emu::g_coordinates.thread_idx))
#define blockIdx (static_cast<const uint3&>(::kbit_emu::g_coordinates.block_idx))
#define blockDim (static_cast<const dim3&>(::kbit_emu::g_coordinates.block_dim))
#define gridDim (static_cast<const dim3&>(::kbit_emu::g_coordinates.grid_dim))
#define warpSize 32

#define __syncthreads() ::kbit_emu::syncthreads(KBIT_EMU_SITE)
#define __syncwarp(...) \
  ((void)::kbit_emu::warp_op(::kbit_emu::kSyncwarp, ::kbit_emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, KBIT_EMU_SITE))
#define __shfl_sync(mask, var, src, ...) \
  ::kbit_emu::shfl(::kbit_emu::kShflIdx, (mask), (var), (src), KBIT_EMU_SITE, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::kbit_emu::shfl(::kbit_emu::kShflUp, (mask), (var), (int)(delta), KBIT_EMU_SITE, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::kbit_emu::shfl(::kbit_emu::kShflDown, (mask), (var), (int)(delta), KBIT_EMU_SITE, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::kbit_emu::shfl(::kbit_emu::kShflXor, (mask), (var), (lane_mask), KBIT_EMU_SITE, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) \
  ((unsigned)::kbit_emu::warp_op(::kbit_emu::kBallot, (mask), (pred) ? 1u : 0u, 0, 32, KBIT_EMU_SITE))
#define __any_sync(mask, pred) ((int)::kbit_emu::warp_op(::kbit_emu::kAny, (mask), (pred) ? 1u : 0u, 0, 32, KBIT_EMU_SITE))
#define __all_sync(mask, pred) ((int)::kbit_emu::warp_op(::kbit_emu::kAll, (mask), (pred) ? 1u : 0u, 0, 32, KBIT_EMU_SITE))

namespace kbit_emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned mask) { return mask; }
}  // namespace kbit_emu

/* Correctly rounded single operations, as on the GPU. They are calls, and the harness compiles with
 * -ffp-contract=off, so nothing fuses them. */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }

#endif /* KBIT_CUDA_EMU_CUDA_RUNTIME_H_ */
