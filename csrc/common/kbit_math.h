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

/* Round to nearest even, overflow to inf, subnormals handled; NaN stays NaN. Branch-free (every case
 * computed, then selected), so CPU loops over it vectorize
 * (checked equal to the branchy rounding on all 2^32 inputs):
 *   normal results: re-bias the exponent and round the 13 dropped bits to nearest even;
 *   subnormal results (|f| < 2^-14): |f| + 0.5f puts the float16 subnormal unit (2^-24) at the last
 *     bit of the float32 sum, so the FPU's own round-to-nearest-even does the rounding;
 *   >= 65520: inf; NaN: quiet NaN keeping the top payload bits. */
KBIT_HD uint16_t kbit_f32_to_f16(float f) {
  uint32_t u = kbit_f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  uint32_t subnormal = kbit_f32_bits(kbit_bits_f32(a) + 0.5f) - 0x3f000000u;
  uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? nan : r;
  return (uint16_t)(sign | r);
}

/* ---- 8-bit blockwise quantization ---- */

/* Normalization of one value by its block's absmax (a true division, as bitsandbytes does). */
KBIT_HD float kbit_normalize(float a, float absmax) { return a / absmax; }

/* The grid bucket of a normalized value; NaN (e.g. 0/0 in an all-zero block) gives bucket 0. */
KBIT_HD int32_t kbit_grid_bucket(float x) {
#if defined(__CUDA_ARCH__)
  /* Explicitly rounded steps: nvcc would otherwise contract the product and the sum into one fma
   * (one rounding instead of two) and the GPU's buckets would differ from the CPU's. */
  float t = __fadd_rn(__fmul_rn(__fadd_rn(x, 1.0f), KBIT_GRID_HALF_SPAN), 0.5f);
#else
  float t = (x + 1.0f) * KBIT_GRID_HALF_SPAN + 0.5f; /* C++17 (ISO mode): no contraction */
#endif
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

/* ---- 4-bit blockwise quantization (NF4, FP4) ----
 *
 * Codebooks as bitsandbytes stores them (float32). A value's code is chosen by its rank among the 16
 * entries sorted ascending: rank = the number of the 15 midpoints between neighbouring sorted entries
 * that x exceeds (ties to the lower entry; NaN exceeds all: rank 15). The code is then the entry's index
 * in the codebook: the identity for NF4 (sorted already), a fixed permutation for FP4. Everything is a
 * function of (quant_type, index), written without tables so host and device share it. */

#define KBIT_ABSMAX4_FLOOR 1e-38f /* the smallest scale a 4-bit block divides by */

/* Entry c of the codebook (quant_type: KBIT_QUANT_NF4, else FP4). */
KBIT_HD float kbit_code4_value(int quant_type, int c) {
  if (quant_type == 1 /* KBIT_QUANT_NF4 */) {
    switch (c & 15) {
      case 0: return -1.0f;
      case 1: return -0.6961928009986877f;
      case 2: return -0.5250730514526367f;
      case 3: return -0.39491748809814453f;
      case 4: return -0.28444138169288635f;
      case 5: return -0.18477343022823334f;
      case 6: return -0.09105003625154495f;
      case 7: return 0.0f;
      case 8: return 0.07958029955625534f;
      case 9: return 0.16093020141124725f;
      case 10: return 0.24611230194568634f;
      case 11: return 0.33791524171829224f;
      case 12: return 0.44070982933044434f;
      case 13: return 0.5626170039176941f;
      case 14: return 0.7229568362236023f;
      default: return 1.0f;
    }
  }
  /* FP4: sign bit 3, then magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12, each a float32 quotient. */
  float mag;
  switch (c & 7) {
    case 0: mag = 0.0f; break;
    case 1: mag = 0.0052083334885537624f; break;
    case 2: mag = 0.6666666865348816f; break;
    case 3: mag = 1.0f; break;
    case 4: mag = 0.3333333432674408f; break;
    case 5: mag = 0.5f; break;
    case 6: mag = 0.1666666716337204f; break;
    default: mag = 0.25f; break;
  }
  return (c & 8) ? -mag : mag;
}

/* The codebook index of the entry of rank r (0..15) as nibbles of one word: entry r of the ascending
 * order. FP4's two zeros rank +0 (code 0) below -0 (code 8), as bitsandbytes orders them. */
KBIT_HD uint64_t kbit_rank_table4(int quant_type) {
  return quant_type == 1 ? 0xFEDCBA9876543210ull : 0x3254761809EFCDABull;
}

KBIT_HD uint8_t kbit_rank_to_code4(uint64_t rank_table, int32_t rank) {
  return (uint8_t)((rank_table >> (4 * rank)) & 15u);
}

/* Midpoint k (0..14) between the entries of rank k and k + 1, in float32 as (a + b) / 2. */
KBIT_HD float kbit_bound4(int quant_type, int k) {
  uint64_t t = kbit_rank_table4(quant_type);
  return (kbit_code4_value(quant_type, kbit_rank_to_code4(t, k)) +
          kbit_code4_value(quant_type, kbit_rank_to_code4(t, k + 1))) * 0.5f;
}

/* Rank of normalized x given the 15 midpoints: branch-free, so CPU loops over values vectorize. */
KBIT_HD int32_t kbit_rank4(const float* bounds, float x) {
  int32_t r = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 15; ++k) r += !(x <= bounds[k]);
  return r;
}

/* The code of normalized x directly, without a rank -> code lookup: the code of rank r is
 * code(0) + sum_{k<r} (code(k+1) - code(k)), and rank r means exactly the first r midpoints are
 * exceeded, so code = base + sum_k [x > bounds[k]] * deltas[k] (base, deltas: kbit_code4_base/delta).
 * Equal to kbit_rank_to_code4(table, kbit_rank4(bounds, x)); linear, so it vectorizes. */
KBIT_HD int32_t kbit_code4_base(int quant_type) { return kbit_rank_to_code4(kbit_rank_table4(quant_type), 0); }
KBIT_HD int32_t kbit_code4_delta(int quant_type, int k) {
  uint64_t t = kbit_rank_table4(quant_type);
  return (int32_t)kbit_rank_to_code4(t, k + 1) - (int32_t)kbit_rank_to_code4(t, k);
}
KBIT_HD int32_t kbit_quantize4_code(const float* bounds, const int32_t* deltas, int32_t base, float x) {
  int32_t c = base;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 15; ++k) c += (x <= bounds[k]) ? 0 : deltas[k];
  return c;
}

/* The scale a block divides by: absmax floored at KBIT_ABSMAX4_FLOOR; NaN stays NaN. */
KBIT_HD float kbit_absmax4_scale(float m) { return m < KBIT_ABSMAX4_FLOOR ? KBIT_ABSMAX4_FLOOR : m; }

/* Normalization of a full block's value: multiplied by the reciprocal of the scale. */
KBIT_HD float kbit_normalize4_full(float a, float inv_scale) { return a * inv_scale; }

/* Two codes in one byte: the first value's in the high nibble. */
KBIT_HD uint8_t kbit_pack4(uint8_t first, uint8_t second) { return (uint8_t)((first << 4) | (second & 15u)); }
KBIT_HD uint8_t kbit_unpack4_first(uint8_t byte) { return (uint8_t)(byte >> 4); }
KBIT_HD uint8_t kbit_unpack4_second(uint8_t byte) { return (uint8_t)(byte & 15u); }

/* The float value of a 4-bit code. */
KBIT_HD float kbit_dequantize4_value(const float* codebook, uint8_t c, float absmax) { return codebook[c] * absmax; }

#endif /* KBIT_COMMON_KBIT_MATH_H_ */
