/*
 * Host-side pieces every CPU kernel file uses: scalar load/store of kbit's element types (one struct
 * per dtype, so kernels take the element type as a template parameter) and the 4-bit codebook
 * tables and AVX2 lookup of the 4-bit dequantize, GEMV and matmul kernels. The conversions themselves
 * are kbit_math.h's.
 */
#ifndef KBIT_CPU_CPU_DTYPE_H_
#define KBIT_CPU_CPU_DTYPE_H_

#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "kbit.h"
#include "kbit_math.h"

namespace kbit {
namespace cpu {

struct F32 {
  static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};
struct F16 {
  static float load(const void* p, int64_t i) { return kbit_f16_to_f32(static_cast<const uint16_t*>(p)[i]); }
  static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = kbit_f32_to_f16(v); }
};
struct BF16 {
  static float load(const void* p, int64_t i) { return kbit_bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
  static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = kbit_f32_to_bf16(v); }
};

/* One value of a dtype known only at run time (a checked dtype: anything else is bfloat16). */
inline float load_dtype(int dtype, const void* p, int64_t i) {
  switch (dtype) {
    case KBIT_DTYPE_F32: return F32::load(p, i);
    case KBIT_DTYPE_F16: return F16::load(p, i);
    default: return BF16::load(p, i);
  }
}

inline void store_dtype(int dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case KBIT_DTYPE_F32: F32::store(p, i, v); break;
    case KBIT_DTYPE_F16: F16::store(p, i, v); break;
    default: BF16::store(p, i, v); break;
  }
}

/* The 16 codebook values of a 4-bit quant type, and for each byte the values of its two codes (high
 * nibble first): pairs[byte][h] * absmax is kbit_dequantize4_value's product, two codes per lookup. */
inline void fill_code4_tables(int quant_type, float* codebook, float (*pairs)[2]) {
  for (int c = 0; c < KBIT_CODEBOOK4_SIZE; ++c) codebook[c] = kbit_code4_value(quant_type, c);
  for (int v = 0; v < 256; ++v) {
    pairs[v][0] = codebook[kbit_unpack4_first((uint8_t)v)];
    pairs[v][1] = codebook[kbit_unpack4_second((uint8_t)v)];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The codebook entries of 8 nibble indices (int32 lanes), the codebook in two registers: vpermps
 * uses the low 3 bits, bit 3 picks the half (moved to the sign bit for the blend). */
__attribute__((target("avx2"))) inline __m256 lookup16_avx2(__m256 lo8, __m256 hi8, __m256i idx) {
  __m256 a = _mm256_permutevar8x32_ps(lo8, idx), b = _mm256_permutevar8x32_ps(hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

}  // namespace cpu
}  // namespace kbit

#endif /* KBIT_CPU_CPU_DTYPE_H_ */
