/*
 * Which runtime-dispatched SIMD kernels the CPU library may use. One switch for every kernel:
 * KBIT_CPU_SIMD=0 in the environment forces the portable x86-64 (or non-x86) loops, which give
 * bit-identical results (but for the GEMV and the matmul, whose FMA kernels sum in another order);
 * KBIT_CPU_SIMD=avx2 allows AVX2 but not AVX-512 (the matmul's AVX-512 kernels). It is read on
 * every call so tests can compare the paths in one process.
 */
#ifndef KBIT_CPU_CPU_FEATURES_H_
#define KBIT_CPU_CPU_FEATURES_H_

#include <stdlib.h>
#include <string.h>

#include "kbit.h"
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace kbit {
namespace cpu {

/* The kernel the calling thread's last call ran, for kbit_last_path(): each entry point records a
 * static "<function>:<path>" where it dispatches, on the calling thread (not on the workers). */
inline thread_local const char* tls_last_path = "";
inline void record_path(const char* path) { tls_last_path = path; }

/* SIMD levels, in order. */
enum SimdLevel : unsigned { kSimdNone = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };

/* The highest level KBIT_CPU_SIMD allows: "0" none, "avx2" AVX2, anything else (unset, "1", "avx512")
 * all. "avx512" leaves out AVX-512-VBMI (a Cooper Lake's AVX-512: its kernels run on later CPUs). */
inline unsigned simd_cap() {
  const char* env = getenv("KBIT_CPU_SIMD");
  if (env == NULL) return kSimdAvx512;
  if (strcmp(env, "0") == 0) return kSimdNone;
  if (strcmp(env, "avx2") == 0) return kSimdAvx2;
  return kSimdAvx512;
}

inline bool vbmi_allowed() {
  const char* env = getenv("KBIT_CPU_SIMD");
  return env == NULL || strcmp(env, "avx512") != 0;
}

inline bool simd_allowed() { return simd_cap() != kSimdNone; }

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

/* CPUID bits of AVX-512 F/BW/VL (1), BF16 (2) and VBMI (8), and whether the OS saves the opmask and ZMM
 * registers (XCR0 bits 5-7, with XMM and YMM). */
inline unsigned read_avx512_features() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return 0;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xE6u) != 0xE6u) return 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const bool f = (b >> 16) & 1u, bw = (b >> 30) & 1u, vl = (b >> 31) & 1u;
  if (!(f && bw && vl)) return 0;
  const unsigned max_sub = a;
  const bool vbmi = (c >> 1) & 1u;
  bool bf16 = false;
  if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) bf16 = (a >> 5) & 1u;
  return 1u | (bf16 ? 2u : 0u) | (vbmi ? 8u : 0u);
}

inline unsigned avx512_features() {
  static volatile unsigned cached = 0; /* features | 4 once known */
  unsigned f = cached;
  if (f == 0) cached = f = read_avx512_features() | 4u;
  return f;
}

/* The highest SIMD level this CPU has (AVX2 means AVX2 + FMA) and KBIT_CPU_SIMD allows. */
inline unsigned simd_level() {
  unsigned cap = simd_cap();
  if (cap >= kSimdAvx512 && (avx512_features() & 1u) && avx2_usable(true)) return kSimdAvx512;
  if (cap >= kSimdAvx2 && avx2_usable(true)) return kSimdAvx2;
  return kSimdNone;
}

/* AVX-512-BF16 (vdpbf16ps, vcvtne2ps2bf16) usable: the CPU has it and AVX-512 is allowed. */
inline bool avx512_bf16_usable() { return simd_level() >= kSimdAvx512 && (avx512_features() & 2u) != 0; }

/* AVX-512-VBMI (vpmultishiftqb) usable: the CPU has it, AVX-512 is allowed and KBIT_CPU_SIMD is not "avx512". */
inline bool avx512_vbmi_usable() {
  return simd_level() >= kSimdAvx512 && (avx512_features() & 8u) != 0 && vbmi_allowed();
}
#endif

/* The kernel family of the 4-bit matmuls (matmul_cpu.cpp, tiled_cpu.cpp) for dtype: AVX-512-BF16 for
 * bfloat16 where usable, else AVX-512, AVX2 + FMA, or the portable loops. */
enum MatmulPath { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline int matmul_path(int dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned level = simd_level();
  if (level >= kSimdAvx512) return dtype == KBIT_DTYPE_BF16 && avx512_bf16_usable() ? kAvx512Bf16 : kAvx512;
  if (level >= kSimdAvx2) return kAvx2;
#else
  (void)dtype;
#endif
  return kPortable;
}

}  // namespace cpu
}  // namespace kbit

#endif  // KBIT_CPU_CPU_FEATURES_H_
