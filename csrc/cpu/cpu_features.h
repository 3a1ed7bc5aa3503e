/*
 * Which runtime-dispatched SIMD kernels the CPU library may use. One switch for every kernel:
 * KBIT_CPU_SIMD=0 in the environment forces the portable x86-64 (or non-x86) loops, which give
 * bit-identical results (but for the GEMV, whose FMA kernel sums in another order); it is
 * read on every call so tests can compare both paths in one process.
 */
#ifndef KBIT_CPU_CPU_FEATURES_H_
#define KBIT_CPU_CPU_FEATURES_H_

#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace kbit {
namespace cpu {

inline bool simd_allowed() {
  const char* env = getenv("KBIT_CPU_SIMD");
  return env == NULL || strcmp(env, "0") != 0;
}

#if defined(__x86_64__) || defined(__i386__)
/* CPUID bits of AVX2 and FMA, and whether the OS saves the YMM registers (XGETBV). Read straight
 * from the CPU rather than with __builtin_cpu_supports, whose data lives in libgcc (the portable
 * link does not bring libgcc). Bit 0: AVX2 usable, bit 1: FMA usable. */
inline unsigned read_avx_features() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, fma = (c >> 12) & 1u;
  if (!osxsave || !avx) return 0;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 6u) != 6u) return 0; /* the OS must save XMM and YMM state */
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const bool avx2 = (b >> 5) & 1u;
  return (avx2 ? 1u : 0u) | (avx2 && fma ? 2u : 0u);
}

/* AVX2 (and, with fma = true, FMA) usable on this CPU and allowed by KBIT_CPU_SIMD. The CPUID answer
 * is computed once (a benign race: every thread computes the same value). */
inline bool avx2_usable(bool fma) {
  if (!simd_allowed()) return false;
  static volatile unsigned cached = 0; /* features | 4 once known */
  unsigned f = cached;
  if (f == 0) cached = f = read_avx_features() | 4u;
  return fma ? (f & 2u) != 0 : (f & 1u) != 0;
}
#endif

}  // namespace cpu
}  // namespace kbit

#endif  // KBIT_CPU_CPU_FEATURES_H_
