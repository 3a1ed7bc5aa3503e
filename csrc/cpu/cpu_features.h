/*
 * Which runtime-dispatched SIMD kernels the CPU library may use. One switch for every kernel:
 * KBIT_CPU_SIMD=0 in the environment forces the portable x86-64 (or non-x86) loops, which give
 * bit-identical results; it is read on every call so tests can compare both paths in one process.
 */
#ifndef KBIT_CPU_CPU_FEATURES_H_
#define KBIT_CPU_CPU_FEATURES_H_

#include <stdlib.h>
#include <string.h>

namespace kbit {
namespace cpu {

inline bool simd_allowed() {
  const char* env = getenv("KBIT_CPU_SIMD");
  return env == NULL || strcmp(env, "0") != 0;
}

#if defined(__x86_64__) || defined(__i386__)
/* AVX2 (and, with fma = true, FMA) usable on this CPU and allowed by KBIT_CPU_SIMD. */
inline bool avx2_usable(bool fma) {
  if (!simd_allowed()) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && (!fma || __builtin_cpu_supports("fma"));
}
#endif

}  // namespace cpu
}  // namespace kbit

#endif  // KBIT_CPU_CPU_FEATURES_H_
