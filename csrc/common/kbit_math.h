/*
 * The per-value math of kbit, shared by the CPU and the CUDA kernels.
 *
 * Everything a kernel computes about one value lives here, so the CPU tests check the exact
 * arithmetic the GPU runs; the kernels only load, reduce absmax per block, and store.
 *
 * 8-bit blockwise quantization of a normalized value x = A[i] / absmax (bitsandbytes-compatible):
 * x is first snapped onto a uniform grid of KBIT_GRID_SIZE points spanning [-1, 1]
 * (bucket j = floor((x + 1) * 32767.5 + 0.5), all in float32), and the code is the codebook entry
 * nearest to that grid point (ties: the lower index). This two-step rule is what bitsandbytes'
 * CPU kernel computes; it differs from a plain nearest search only for x within half a grid step
 * (1.5e-5) of the midpoint between two entries. Because the answer depends on j only, a CPU caller
 * may tabulate kbit_nearest_code(code, kbit_grid_point(j)) for every j, and the GPU may compute it
 * on the fly: both give the same codes by construction.
 */
#ifndef KBIT_COMMON_KBIT_MATH_H_
#define KBIT_COMMON_KBIT_MATH_H_

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KBIT_HD __host__ __device__ __forceinline__
#else
#define KBIT_HD static inline
#endif

#define KBIT_GRID_SIZE 65536
#define KBIT_GRID_HALF_SPAN 32767.5f /* (KBIT_GRID_SIZE - 1) / 2 */

/* ---- float16 / bfloat16 <-> float32, bit-exact and portable (no sm_80 instructions). ---- */

KBIT_HD uint32_t kbit_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

KBIT_HD float kbit_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

KBIT_HD float kbit_bf16_to_f32(uint16_t h) { return kbit_bits_f32((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN with its sign. */
KBIT_HD uint16_t kbit_f32_to_bf16(float f) {
  uint32_t u = kbit_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

KBIT_HD float kbit_f16_to_f32(uint16_t h) {
  /* Branch-free, so loops over it vectorize: the magnitude bits moved into float32 position and
   * scaled by 2^112 re-bias the exponent, exactly, for normals and subnormals alike; inf and NaN
   * (payload kept) take the all-ones exponent. */
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t scaled = kbit_f32_bits(kbit_bits_f32(em << 13) * 5.192296858534828e33f /* 2^112 */);
  uint32_t special = (em << 13) | 0x7f800000u;
  return kbit_bits_f32(sign | (em >= 0x7c00u ? special : scaled));
}

/* Round to nearest even, overflow to inf, subnormals handled; NaN stays NaN. */
KBIT_HD uint16_t kbit_f32_to_f16(float f) {
  uint32_t u = kbit_f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
  if (a < 0x38800000u) {                                     /* below 2^-14: subnormal or zero */
    if (a < 0x33000000u) return sign;                        /* below 2^-25: rounds to 0 */
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return (uint16_t)(sign | q);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u; /* rebias 127 -> 15, round */
  return (uint16_t)(sign | (uint16_t)(r >> 13));
}

/* ---- 8-bit blockwise quantization ---- */

/* Normalization of one value by its block's absmax (a true division, as bitsandbytes does). */
KBIT_HD float kbit_normalize(float a, float absmax) { return a / absmax; }

/* The grid bucket of a normalized value; NaN (e.g. 0/0 in an all-zero block) gives bucket 0. */
KBIT_HD int32_t kbit_grid_bucket(float x) {
  float t = (x + 1.0f) * KBIT_GRID_HALF_SPAN + 0.5f;
  t = t >= 0.0f ? t : 0.0f; /* also maps NaN to 0 */
  t = t <= (float)(KBIT_GRID_SIZE - 1) ? t : (float)(KBIT_GRID_SIZE - 1);
  return (int32_t)t; /* t >= 0: truncation is floor */
}

/* The grid point of bucket j: monotone non-decreasing in j. */
KBIT_HD float kbit_grid_point(int32_t j) { return (float)j / KBIT_GRID_HALF_SPAN - 1.0f; }

/* Given lo = the largest index in [0, 254] with code[lo] <= x (0 when x < code[0]), the nearer of
 * code[lo] and code[lo + 1]; ties go to the lower index. */
KBIT_HD uint8_t kbit_pick_neighbor(const float* code, int32_t lo, float x) {
  float dl = x - code[lo];
  float dh = code[lo + 1] - x;
  dl = dl < 0.0f ? -dl : dl;
  dh = dh < 0.0f ? -dh : dh;
  return (uint8_t)(dh < dl ? lo + 1 : lo);
}

/* Index of the entry of the ascending 256-entry codebook nearest to x (ties: the lower index).
 * Branch-free binary search: 7 steps find lo in [0, 254]. x must not be NaN. */
KBIT_HD uint8_t kbit_nearest_code(const float* code, float x) {
  int32_t lo = 0;
  /* invariant: answer lo in [lo, lo + 2*step - 1] intersected with [0, 254] */
  for (int32_t step = 128; step >= 2; step >>= 1) {
    int32_t probe = lo + step;
    lo = (probe <= 254 && code[probe] <= x) ? probe : lo;
  }
  lo = (lo + 1 <= 254 && code[lo + 1] <= x) ? lo + 1 : lo;
  return kbit_pick_neighbor(code, lo, x);
}

/* The 8-bit code of one value, given its block's absmax. */
KBIT_HD uint8_t kbit_quantize_value(const float* code, float a, float absmax) {
  return kbit_nearest_code(code, kbit_grid_point(kbit_grid_bucket(kbit_normalize(a, absmax))));
}

/* The float value of one code. */
KBIT_HD float kbit_dequantize_value(const float* code, uint8_t c, float absmax) {
  return code[c] * absmax;
}

#endif /* KBIT_COMMON_KBIT_MATH_H_ */
