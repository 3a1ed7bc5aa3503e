/*
 * kbit_adam_8bit_blockwise on the host: one step of 8-bit blockwise Adam/AdamW, in place.
 *
 * Work is split over blocks of KBIT_OPTIM8_BLOCKSIZE values (parallel.h). Each block runs in
 * passes over stack buffers, so the arithmetic passes vectorize and the table lookups (gathers on a
 * baseline x86-64) stay apart:
 *   1. dequantize m and v (codebook lookups),
 *   2. the per-value step (kbit_optim_math.h), p stored back, and the NaN-propagating max |m|, |v|,
 *   3. normalize by the new absmax,
 *   4. the nearest codebook entry of each normalized value.
 * Step 4 is kbit_nearest_code (a binary search, then the nearer neighbour, ties to the lower index).
 * For large calls it goes through a cache that gives the same codes: kbit_nearest_code(qmap, x) is
 * a non-decreasing step function of x (the lower neighbour only moves up with x, and between two
 * neighbours the "upper is strictly nearer" test, on float differences, flips once), so it equals
 * the number of thresholds T_k <= x, where T_k is the smallest float whose code exceeds k, found once
 * per call by bisection over the floats of [-2, 2] with kbit_nearest_code itself as the oracle. A table indexed
 * by the top 16 bits of x's order-preserving integer key holds that count at each bucket's smallest
 * float, and a few branch-free steps over the thresholds finish it (1 for the dynamic maps).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "kbit_optim_math.h"
#include "cpu_dtype.h"
#include "cpu_features.h"
#include "parallel.h"

namespace kbit {
namespace {

const int64_t kBlock = KBIT_OPTIM8_BLOCKSIZE;
/* Below this many values, building the two search tables costs more than it saves. */
const int64_t kSearchTableMinValues = 1 << 16;
const int kSearchTableBits = 16;
const int64_t kSearchTableSize = (int64_t)1 << kSearchTableBits;
/* Values per parallel chunk, so thread starts are amortized. */
const int64_t kAdamValuesPerTask = 1 << 15;

/* A monotone map of float to uint32: a < b (as floats, not NaN) implies key(a) <= key(b). */
inline uint32_t order_key(float x) {
  uint32_t u = kbit_f32_bits(x);
  uint32_t neg = (uint32_t)((int32_t)u >> 31); /* all ones for a negative sign: ~u; else u | sign bit */
  return u ^ (neg | 0x80000000u);
}

inline float key_float(uint32_t key) { return kbit_bits_f32((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key); }

/* The cache covers |x| <= kCacheDomain: the normalized states lie in [-1, 1]. (Far outside, e.g. at
 * +inf, where x - entry rounds to the same value for neighbouring entries, kbit_nearest_code is not
 * monotone, so the cache would not describe it there.) */
const float kCacheDomain = 2.0f;

/* The cache of kbit_nearest_code for one qmap (see the top of the file). */
struct SearchCache {
  float qmap[KBIT_CODEBOOK8_SIZE];
  float thresholds[KBIT_CODEBOOK8_SIZE]; /* T_k for k in [0, 254]; NaN: no float's code exceeds k */
  int32_t walk;                           /* steps after the table lookup */
  uint8_t table[kSearchTableSize];        /* #{k : T_k <= the bucket's smallest float} */
};

void build_search_cache(const float* qmap, SearchCache* c) {
  memcpy(c->qmap, qmap, sizeof c->qmap);
  const uint32_t lowest = order_key(-kCacheDomain), highest = order_key(kCacheDomain);
  for (int k = 0; k < KBIT_CODEBOOK8_SIZE - 1; ++k) {
    if (kbit_nearest_code(qmap, kCacheDomain) <= k) {
      c->thresholds[k] = NAN;
      continue;
    }
    uint32_t lo = lowest, hi = highest; /* the answer is in [lo, hi]: code(key_float(hi)) > k */
    while (lo < hi) {
      uint32_t mid = lo + (hi - lo) / 2;
      if (kbit_nearest_code(qmap, key_float(mid)) > k) hi = mid; else lo = mid + 1;
    }
    c->thresholds[k] = key_float(lo);
  }
  c->thresholds[KBIT_CODEBOOK8_SIZE - 1] = NAN; /* never reached: the count stops at 255 */
  int32_t count = 0, walk = 0, prev = 0;
  for (int64_t t = 0; t < kSearchTableSize; ++t) {
    float s = key_float((uint32_t)(t << (32 - kSearchTableBits)));
    if (s == s) /* NaN buckets (keys below -inf's or above +inf's) keep the running count */
      while (count < KBIT_CODEBOOK8_SIZE - 1 && c->thresholds[count] <= s) ++count;
    c->table[t] = (uint8_t)count;
    walk = count - prev > walk ? count - prev : walk;
    prev = count;
  }
  /* x in bucket t lies below bucket t + 1's start, so it passes at most table[t + 1] - table[t]
   * thresholds beyond table[t] (the cache serves |x| <= kCacheDomain only, whose buckets all have a
   * next bucket with a float start). */
  c->walk = walk;
}

/* kbit_nearest_code(qmap, x), through the cache. WALK1: the cache's walk is at most 1 (the dynamic
 * maps), so one step, unrolled. */
template <bool WALK1>
inline uint8_t nearest_code_cached(const SearchCache* __restrict c, float x) {
  if (!(fabsf(x) <= kCacheDomain)) return kbit_nearest_code(c->qmap, x); /* NaN, or never (|x| <= 1) */
  int32_t code = c->table[order_key(x) >> (32 - kSearchTableBits)];
  const int32_t steps = WALK1 ? 1 : c->walk;
  for (int32_t s = 0; s < steps; ++s) code += (code < KBIT_CODEBOOK8_SIZE - 1) & (c->thresholds[code] <= x);
  return (uint8_t)code;
}

/* The codes of one block's normalized values. The common case (every |x| <= kCacheDomain, and a
 * walk of at most 1) in two passes: bucket indices (vectorized), then one table lookup and one
 * threshold step per value; otherwise value by value. */
inline void requantize_cached(const SearchCache* __restrict c, const float* __restrict x, uint8_t* __restrict out,
                              int64_t len) {
  uint32_t bucket[KBIT_OPTIM8_BLOCKSIZE];
  uint32_t outside = 0;
  for (int64_t i = 0; i < len; ++i) {
    bucket[i] = order_key(x[i]) >> (32 - kSearchTableBits);
    outside |= (uint32_t)!(fabsf(x[i]) <= kCacheDomain);
  }
  if (outside == 0 && c->walk <= 1) {
    const uint8_t* __restrict table = c->table;
    const float* __restrict thr = c->thresholds;
    for (int64_t i = 0; i < len; ++i) {
      int32_t code = table[bucket[i]];
      out[i] = (uint8_t)(code + ((code < KBIT_CODEBOOK8_SIZE - 1) & (thr[code] <= x[i])));
    }
  } else if (c->walk <= 1) {
    for (int64_t i = 0; i < len; ++i) out[i] = nearest_code_cached<true>(c, x[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = nearest_code_cached<false>(c, x[i]);
  }
}

struct AdamJob {
  void* p;
  const void* g;
  uint8_t* state1;
  uint8_t* state2;
  float* absmax1;
  float* absmax2;
  int64_t n;
  KbitAdamParams q;
  const SearchCache* cache1; /* NULL: binary search per value */
  const SearchCache* cache2;
  float qmap1[KBIT_CODEBOOK8_SIZE];
  float qmap2[KBIT_CODEBOOK8_SIZE];
};

inline float max_bits(const uint32_t* __restrict bits, int64_t len) {
  uint32_t m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) m[k] = bits[i + k] > m[k] ? bits[i + k] : m[k];
  for (; i < len; ++i) m[0] = bits[i] > m[0] ? bits[i] : m[0];
  uint32_t r = m[0];
  for (int k = 1; k < 8; ++k) r = m[k] > r ? m[k] : r;
  return kbit_bits_f32(r);
}

/* out[i] = sqrtf(in[i]), correctly rounded. */
inline void sqrt_buffer(const float* __restrict in, float* __restrict out, int64_t len) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= len; i += 4) _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#endif
  for (; i < len; ++i) out[i] = sqrtf(in[i]);
}

template <typename T>
void adam_blocks(void* ctx, int64_t first_block, int64_t end_block) {
  const AdamJob& job = *static_cast<const AdamJob*>(ctx);
  const KbitAdamParams q = job.q;
  float lut1[KBIT_CODEBOOK8_SIZE], lut2[KBIT_CODEBOOK8_SIZE]; /* local copies: no aliasing with stores */
  memcpy(lut1, job.qmap1, sizeof lut1);
  memcpy(lut2, job.qmap2, sizeof lut2);
  uint8_t* __restrict s1 = job.state1;
  uint8_t* __restrict s2 = job.state2;
  float m[kBlock], v[kBlock], pd[kBlock], sv[kBlock];
  uint32_t mb[kBlock], vb[kBlock];
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * kBlock;
    int64_t len = job.n - start < kBlock ? job.n - start : kBlock;
    float a1 = job.absmax1[b], a2 = job.absmax2[b];
    /* 1. dequantize */
    for (int64_t i = 0; i < len; ++i) {
      m[i] = kbit_dequantize_value(lut1, s1[start + i], a1);
      v[i] = kbit_dequantize_value(lut2, s2[start + i], a2);
    }
    /* 2. the step, in three passes: sqrtf sets errno, so a loop calling it stays scalar; the square
     * roots of the whole buffer are taken apart (SSE2's sqrtps, IEEE like sqrtf). */
    for (int64_t i = 0; i < len; ++i) {
      float pv = T::load(job.p, start + i);
      float mv = m[i], vv = v[i];
      kbit_adam_moments(&q, &pv, T::load(job.g, start + i), &mv, &vv);
      pd[i] = pv;
      m[i] = mv;
      v[i] = vv;
    }
    sqrt_buffer(v, sv, len);
    for (int64_t i = 0; i < len; ++i) {
      T::store(job.p, start + i, kbit_adam_apply(&q, pd[i], m[i], sv[i]));
      mb[i] = kbit_abs_bits(m[i]);
      vb[i] = kbit_abs_bits(v[i]);
    }
    float n1 = max_bits(mb, len), n2 = max_bits(vb, len);
    job.absmax1[b] = n1;
    job.absmax2[b] = n2;
    /* 3. normalize */
    for (int64_t i = 0; i < len; ++i) {
      m[i] = kbit_optim_normalize(m[i], n1);
      v[i] = kbit_optim_normalize(v[i], n2);
    }
    /* 4. requantize */
    if (job.cache1 != NULL) {
      requantize_cached(job.cache1, m, s1 + start, len);
      requantize_cached(job.cache2, v, s2 + start, len);
    } else {
      for (int64_t i = 0; i < len; ++i) s1[start + i] = kbit_optim_code(lut1, m[i]);
      for (int64_t i = 0; i < len; ++i) s2[start + i] = kbit_optim_code(lut2, v[i]);
    }
  }
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" KBIT_API int kbit_adam_8bit_blockwise(int dtype, void* p, const void* g, uint8_t* state1, uint8_t* state2,
                                                 float* absmax1, float* absmax2, const float* qmap1,
                                                 const float* qmap2, float beta1, float beta2, float eps,
                                                 float weight_decay, float lr, int32_t step, float gnorm_scale,
                                                 int decoupled_weight_decay, int64_t n, void* stream) {
  (void)stream;
  KbitAdamParams q;
  int status = prepare_adam8(dtype, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, beta1, beta2, eps,
                             weight_decay, lr, step, gnorm_scale, decoupled_weight_decay, n, &q);
  if (status != KBIT_OK || n == 0) return status;
  AdamJob* job = static_cast<AdamJob*>(malloc(sizeof(AdamJob)));
  if (job == NULL) return KBIT_ERR_INTERNAL;
  job->p = p;
  job->g = g;
  job->state1 = state1;
  job->state2 = state2;
  job->absmax1 = absmax1;
  job->absmax2 = absmax2;
  job->n = n;
  job->q = q;
  memcpy(job->qmap1, qmap1, sizeof job->qmap1);
  memcpy(job->qmap2, qmap2, sizeof job->qmap2);
  SearchCache* caches = NULL;
  job->cache1 = job->cache2 = NULL;
  if (n >= kSearchTableMinValues) {
    caches = static_cast<SearchCache*>(malloc(2 * sizeof(SearchCache)));
    if (caches != NULL) { /* no memory: search per value */
      build_search_cache(job->qmap1, &caches[0]);
      build_search_cache(job->qmap2, &caches[1]);
      job->cache1 = &caches[0];
      job->cache2 = &caches[1];
    }
  }
  int64_t blocks = (n + kBlock - 1) / kBlock;
  int64_t grain = kAdamValuesPerTask / kBlock;
  cpu::record_path("kbit_adam_8bit_blockwise:portable");
  switch (dtype) {
    case KBIT_DTYPE_F32: parallel_for(blocks, grain, adam_blocks<cpu::F32>, job); break;
    case KBIT_DTYPE_F16: parallel_for(blocks, grain, adam_blocks<cpu::F16>, job); break;
    default: parallel_for(blocks, grain, adam_blocks<cpu::BF16>, job); break;
  }
  free(caches);
  free(job);
  return KBIT_OK;
}
