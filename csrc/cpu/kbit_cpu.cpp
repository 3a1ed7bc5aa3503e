/*
 * libkbit_cpu.so: the kbit C ABI on host memory.
 *
 * Blocks are independent, so work is split over blocks (parallel.h). Each block is read from memory
 * once: its absmax pass brings it into L1/L2 and the quantize pass reads it from there.
 *
 * Two implementations of every kernel, with the same results bit for bit:
 *   - portable C++ (any CPU): inner loops over one block's contiguous values with restrict-qualified
 *     pointers, written so the compiler vectorizes them for the baseline ISA;
 *   - AVX2 (x86-64 CPUs that have it, chosen at run time; KBIT_CPU_SIMD=0 forces the portable one):
 *     the same arithmetic, 8 values per instruction, with the lookups done by in-register permutes
 *     and gathers. They handle full blocks and leave a partial last block to the portable code.
 * 8-bit quantization looks codes up in a table of KBIT_GRID_SIZE entries, one per grid bucket (see
 * kbit_math.h): entry j is the codebook entry nearest to grid point j, which is exactly what
 * kbit_quantize_value computes, so the table is a cache of the shared math, not a second rule. The
 * tables of the last few codebooks are kept (GridTable below), so one is built once per codebook.
 * 4-bit quantization finds the rank of x among the 15 midpoints by a 4-step binary search whose
 * midpoints come from in-register tables; the midpoints are sorted, so the rank equals
 * kbit_quantize4_code's count of exceeded midpoints (NaN exceeds all in both).
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "cpu_dtype.h"
#include "cpu_features.h"
#include "parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#define KBIT_X86_AVX2 1
#include <immintrin.h>
/* AVX2 only, deliberately not FMA: a contracted multiply-add rounds once where kbit_math.h rounds twice. */
#define KBIT_AVX2 __attribute__((target("avx2")))
#endif

namespace kbit {
namespace {

/* Below this many values the per-value search beats a table lookup (counting a first build). */
const int64_t kGridTableMinValues = 16384;
/* Values per pass of the two-pass portable loops (an int32 per value on the stack). */
const int64_t kQuantizeChunk = 512;
/* Values per parallel task: large enough to amortize scheduling, small enough to balance. */
const int64_t kValuesPerChunk = 65536;

int64_t grain_for(int32_t blocksize) { return kValuesPerChunk / blocksize > 0 ? kValuesPerChunk / blocksize : 1; }

#if defined(KBIT_X86_AVX2)
/* Whether to run the AVX2 kernels: the CPU supports them and KBIT_CPU_SIMD is not "0". */
bool use_avx2() { return kbit::cpu::avx2_usable(false); }

/* Bit-exact vector forms of kbit_math.h's conversions (same integer/float steps, 8 lanes). */
KBIT_AVX2 inline __m256 avx2_f16_to_f32(__m128i h16) {
  __m256i h = _mm256_cvtepu16_epi32(h16);
  __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
  __m256i e13 = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x7fff)), 13);
  __m256i scaled = _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(e13), _mm256_set1_ps(5.192296858534828e33f)));
  __m256i special = _mm256_or_si256(e13, _mm256_set1_epi32(0x7f800000));
  __m256i is_special = _mm256_cmpgt_epi32(e13, _mm256_set1_epi32((0x7c00 << 13) - 1)); /* em >= 0x7c00 */
  return _mm256_castsi256_ps(_mm256_or_si256(sign, _mm256_blendv_epi8(scaled, special, is_special)));
}

/* Eight uint32 lanes, each <= 0xffff, to eight uint16 in order. */
KBIT_AVX2 inline __m128i avx2_narrow16(__m256i v) {
  return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

KBIT_AVX2 inline __m128i avx2_f32_to_bf16(__m256 f) {
  __m256i u = _mm256_castps_si256(f);
  __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  __m256i is_nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000));
  __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))),
      16);
  __m256i nan = _mm256_or_si256(hi, _mm256_set1_epi32(0x0040));
  return avx2_narrow16(_mm256_blendv_epi8(rounded, nan, is_nan));
}

KBIT_AVX2 inline __m128i avx2_f32_to_f16(__m256 f) {
  __m256i u = _mm256_castps_si256(f);
  __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000));
  __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  __m256i a13 = _mm256_srli_epi32(a, 13);
  __m256i normal = _mm256_srli_epi32(
      _mm256_sub_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0xfff)),
                                        _mm256_and_si256(a13, _mm256_set1_epi32(1))),
                       _mm256_set1_epi32(0x38000000)),
      13);
  __m256i subnormal = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(0.5f))), _mm256_set1_epi32(0x3f000000));
  __m256i nan = _mm256_or_si256(_mm256_set1_epi32(0x7e00), _mm256_and_si256(a13, _mm256_set1_epi32(0x3ff)));
  __m256i r = _mm256_blendv_epi8(normal, subnormal, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x38800000), a));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7c00), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x477ff000 - 1)));
  r = _mm256_blendv_epi8(r, nan, _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
  return avx2_narrow16(_mm256_or_si256(sign, r));
}
#endif

/* The element types: cpu_dtype.h's scalar load/store, plus 8 values at a time with AVX2. */
struct LoadF32 : cpu::F32 {
  static const int kBytes = 4;
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 __m256 load8(const void* p, int64_t i) { return _mm256_loadu_ps(static_cast<const float*>(p) + i); }
#endif
};
struct LoadF16 : cpu::F16 {
  static const int kBytes = 2;
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 __m256 load8(const void* p, int64_t i) {
    return avx2_f16_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
#endif
};
struct LoadBF16 : cpu::BF16 {
  static const int kBytes = 2;
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 __m256 load8(const void* p, int64_t i) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
};

struct StoreF32 : cpu::F32 {
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 void store8(void* p, int64_t i, __m256 v) { _mm256_storeu_ps(static_cast<float*>(p) + i, v); }
#endif
};
struct StoreF16 : cpu::F16 {
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 void store8(void* p, int64_t i, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), avx2_f32_to_f16(v));
  }
#endif
};
struct StoreBF16 : cpu::BF16 {
#if defined(KBIT_X86_AVX2)
  static KBIT_AVX2 void store8(void* p, int64_t i, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), avx2_f32_to_bf16(v));
  }
#endif
};

/* ---- grid tables of 8-bit codebooks ---- */

/* table[j] = kbit_nearest_code(code, kbit_grid_point(j)) for every bucket j, in one merge pass:
 * grid points ascend with j and the codebook ascends, so the lower neighbor only moves forward. */
void build_grid_table(const float* code, uint8_t* table) {
  int32_t lo = 0;
  for (int32_t j = 0; j < KBIT_GRID_SIZE; ++j) {
    float x = kbit_grid_point(j);
    while (lo < 254 && code[lo + 1] <= x) ++lo;
    table[j] = kbit_pick_neighbor(code, lo, x);
  }
}

/* A built table and the codebook it was built from. Immutable once built; `refs` (under
 * g_grid_lock) keeps it alive while calls use it. */
struct GridTable {
  float code[KBIT_CODEBOOK8_SIZE];
  uint8_t table[KBIT_GRID_SIZE + 4]; /* 4 spare bytes: the AVX2 gather loads 4 bytes at table + j */
  int refs;
  bool cached;
  uint64_t last_use;
};

/* The tables of the last kGridCacheSlots codebooks (bitwise-equal codebooks share one). Building a
 * table costs about as much as quantizing a million values, so it is done once per codebook. */
const int kGridCacheSlots = 4;
pthread_mutex_t g_grid_lock = PTHREAD_MUTEX_INITIALIZER;
GridTable* g_grid_cache[kGridCacheSlots];
uint64_t g_grid_clock;
pthread_once_t g_grid_atfork_once = PTHREAD_ONCE_INIT;

/* fork() while another thread holds the lock would leave it locked forever in the child. */
void grid_lock() { pthread_mutex_lock(&g_grid_lock); }
void grid_unlock() { pthread_mutex_unlock(&g_grid_lock); }
void register_grid_atfork() { pthread_atfork(grid_lock, grid_unlock, grid_unlock); }

/* The table of `code`, from the cache or built now; NULL when out of memory. */
GridTable* acquire_grid_table(const float* code) {
  pthread_once(&g_grid_atfork_once, register_grid_atfork);
  grid_lock();
  for (int s = 0; s < kGridCacheSlots; ++s) {
    GridTable* t = g_grid_cache[s];
    if (t != NULL && memcmp(t->code, code, sizeof t->code) == 0) {
      ++t->refs;
      t->last_use = ++g_grid_clock;
      grid_unlock();
      return t;
    }
  }
  grid_unlock();
  GridTable* t = static_cast<GridTable*>(malloc(sizeof(GridTable)));
  if (t == NULL) return NULL;
  memcpy(t->code, code, sizeof t->code);
  build_grid_table(t->code, t->table);
  memset(t->table + KBIT_GRID_SIZE, 0, 4);
  t->refs = 1;
  t->cached = false;
  grid_lock();
  /* Into an empty slot, else in place of the least recently used table no call is using. */
  int victim = -1;
  for (int s = 0; s < kGridCacheSlots; ++s) {
    GridTable* o = g_grid_cache[s];
    if (o == NULL) {
      victim = s;
      break;
    }
    if (o->refs == 0 && (victim < 0 || o->last_use < g_grid_cache[victim]->last_use)) victim = s;
  }
  if (victim >= 0) {
    free(g_grid_cache[victim]); /* NULL or unused */
    g_grid_cache[victim] = t;
    t->cached = true;
    t->last_use = ++g_grid_clock;
  }
  grid_unlock();
  return t;
}

void release_grid_table(GridTable* t) {
  grid_lock();
  bool drop = --t->refs == 0 && !t->cached;
  grid_unlock();
  if (drop) free(t);
}

/* ---- 8-bit ---- */

struct QuantizeJob {
  const void* A;
  const float* code;
  const uint8_t* table; /* NULL: search the codebook per value */
  uint8_t* out;
  float* absmax;
  int64_t n;
  int64_t blocksize;
};

int64_t block_len(int64_t n, int64_t blocksize, int64_t b) {
  int64_t start = b * blocksize;
  return n - start < blocksize ? n - start : blocksize;
}

/* max |A[i]| of one block, on the bits: for |v| the IEEE order is the integer order, so the max is
 * an integer max, which vectorizes without fast-math flags; 8 independent partial maxima.
 * IGNORE_NAN: a NaN (bits above infinity's) counts as 0 and never wins, as bitsandbytes' 8-bit path
 * computes it; otherwise a NaN propagates (its bits win), as its 4-bit path (torch's max) does. */
template <typename L, bool IGNORE_NAN>
float block_absmax(const void* A, int64_t start, int64_t len) {
  uint32_t m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      uint32_t u = kbit_f32_bits(L::load(A, start + i + k)) & 0x7fffffffu;
      if (IGNORE_NAN) u = u > 0x7f800000u ? 0u : u;
      m[k] = u > m[k] ? u : m[k];
    }
  for (; i < len; ++i) {
    uint32_t u = kbit_f32_bits(L::load(A, start + i)) & 0x7fffffffu;
    if (IGNORE_NAN) u = u > 0x7f800000u ? 0u : u;
    m[0] = u > m[0] ? u : m[0];
  }
  uint32_t r = m[0];
  for (int k = 1; k < 8; ++k) r = m[k] > r ? m[k] : r;
  return kbit_bits_f32(r);
}

template <typename L>
void quantize_block(const QuantizeJob& job, int64_t b) {
  const uint8_t* __restrict table = job.table;
  uint8_t* __restrict out = job.out;
  int64_t start = b * job.blocksize;
  int64_t len = block_len(job.n, job.blocksize, b);
  float m = block_absmax<L, true>(job.A, start, len);
  job.absmax[b] = m;
  if (table != NULL) {
    /* Two passes per chunk: the arithmetic (load, divide, snap to the grid) vectorizes; the
     * table lookup is a gather, done apart so it does not keep the first pass scalar. */
    int32_t bucket[kQuantizeChunk];
    for (int64_t c = 0; c < len; c += kQuantizeChunk) {
      int64_t cnt = len - c < kQuantizeChunk ? len - c : kQuantizeChunk;
      for (int64_t k = 0; k < cnt; ++k) bucket[k] = kbit_grid_bucket(kbit_normalize(L::load(job.A, start + c + k), m));
      for (int64_t k = 0; k < cnt; ++k) out[start + c + k] = table[bucket[k]];
    }
  } else {
    for (int64_t i = 0; i < len; ++i) out[start + i] = kbit_quantize_value(job.code, L::load(job.A, start + i), m);
  }
}

template <typename L>
void quantize_range(void* ctx, int64_t first_block, int64_t end_block) {
  const QuantizeJob& job = *static_cast<const QuantizeJob*>(ctx);
  for (int64_t b = first_block; b < end_block; ++b) quantize_block<L>(job, b);
}

struct DequantizeJob {
  const uint8_t* codes;
  const float* code;
  const float* absmax;
  void* out;
  int64_t n;
  int64_t blocksize;
};

template <typename S>
void dequantize_range(void* ctx, int64_t first_block, int64_t end_block) {
  const DequantizeJob& job = *static_cast<const DequantizeJob*>(ctx);
  const uint8_t* __restrict codes = job.codes;
  float lut[KBIT_CODEBOOK8_SIZE]; /* local copy: no aliasing with `out` */
  for (int k = 0; k < KBIT_CODEBOOK8_SIZE; ++k) lut[k] = job.code[k];
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = block_len(job.n, job.blocksize, b);
    float m = job.absmax[b];
    for (int64_t i = 0; i < len; ++i) S::store(job.out, start + i, kbit_dequantize_value(lut, codes[start + i], m));
  }
}

#if defined(KBIT_X86_AVX2)
/* AVX-512 (no FMA: the product is code[c] * absmax, rounded once, as kbit_dequantize_value). */
#define KBIT_AVX512 __attribute__((target("avx512f,avx2")))

/* code[idx] for 16 indices < 256 from the codebook held in 16 registers: 8 two-register permutes
 * (vpermt2ps: the index's low 5 bits) and a select tree on bits 5, 6 and 7. */
KBIT_AVX512 inline __m512 lookup256(const __m512* t, __m512i idx) {
  __m512 r[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  for (int j = 0; j < 4; ++j) r[j] = _mm512_mask_blend_ps(b5, r[2 * j], r[2 * j + 1]);
  for (int j = 0; j < 2; ++j) r[j] = _mm512_mask_blend_ps(b6, r[2 * j], r[2 * j + 1]);
  return _mm512_mask_blend_ps(b7, r[0], r[1]);
}

template <typename S>
KBIT_AVX512 inline void store16(void* p, int64_t i, __m512 v) {
  if (std::is_same<S, StoreF32>::value) {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
  } else {
    S::store8(p, i, _mm512_castps512_ps256(v));
    S::store8(p, i + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
}

/* dequantize_range with the lookup in registers, 16 values per step; the same products. */
template <typename S>
KBIT_AVX512 void dequantize_range_avx512(void* ctx, int64_t first_block, int64_t end_block) {
  const DequantizeJob& job = *static_cast<const DequantizeJob*>(ctx);
  const uint8_t* __restrict codes = job.codes;
  __m512 t[16];
  for (int j = 0; j < 16; ++j) t[j] = _mm512_loadu_ps(job.code + 16 * j);
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = block_len(job.n, job.blocksize, b);
    float m = job.absmax[b];
    const __m512 vm = _mm512_set1_ps(m);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + start + i)));
      store16<S>(job.out, start + i, _mm512_mul_ps(lookup256(t, idx), vm));
    }
    for (; i < len; ++i) S::store(job.out, start + i, kbit_dequantize_value(job.code, codes[start + i], m));
  }
}
#endif

/* ---- 4-bit ---- */

struct Quantize4Job {
  const void* A;
  uint8_t* out;
  float* absmax;
  int64_t n;
  int64_t blocksize;
};

/* QT is the quant type as a compile-time constant: the midpoints and code steps then fold into
 * immediates (NF4's steps are all 1), which keeps the per-value loop to compares and adds. */
template <typename L, int QT>
void quantize4_block(const Quantize4Job& job, int64_t b) {
  float bounds[15]; /* local copies: no aliasing with `out` */
  int32_t deltas[15];
#pragma GCC unroll 15
  for (int k = 0; k < 15; ++k) bounds[k] = kbit_bound4(QT, k), deltas[k] = kbit_code4_delta(QT, k);
  const int32_t base = kbit_code4_base(QT);
  const int32_t zero_code = kbit_quantize4_code(bounds, deltas, base, 0.0f); /* the padding nibble of an odd n */
  uint8_t* __restrict out = job.out;
  int32_t code[kQuantizeChunk + 1];
  int64_t start = b * job.blocksize;
  int64_t len = block_len(job.n, job.blocksize, b);
  bool partial = len < job.blocksize;
  float m = block_absmax<L, false>(job.A, start, len);
  float scale = kbit_absmax4_scale(m);
  job.absmax[b] = partial ? scale : m;
  float inv = 1.0f / scale;
  for (int64_t c = 0; c < len; c += kQuantizeChunk) {
    int64_t cnt = len - c < kQuantizeChunk ? len - c : kQuantizeChunk;
    /* Pass 1: load, normalize, code. Pass 2: pack pairs. Both vectorize. */
    if (!partial) {
      for (int64_t k = 0; k < cnt; ++k)
        code[k] = kbit_quantize4_code(bounds, deltas, base, kbit_normalize4_full(L::load(job.A, start + c + k), inv));
    } else {
      for (int64_t k = 0; k < cnt; ++k)
        code[k] = kbit_quantize4_code(bounds, deltas, base, kbit_normalize(L::load(job.A, start + c + k), scale));
    }
    code[cnt] = zero_code;
    uint8_t* __restrict dst = out + (start + c) / 2; /* start and c are even */
    int64_t bytes = (cnt + 1) / 2;
    for (int64_t j = 0; j < bytes; ++j) dst[j] = kbit_pack4((uint8_t)code[2 * j], (uint8_t)code[2 * j + 1]);
  }
}

template <typename L, int QT>
void quantize4_range(void* ctx, int64_t first_block, int64_t end_block) {
  const Quantize4Job& job = *static_cast<const Quantize4Job*>(ctx);
  for (int64_t b = first_block; b < end_block; ++b) quantize4_block<L, QT>(job, b);
}

struct Dequantize4Job {
  const uint8_t* packed;
  const float* absmax;
  void* out;
  int64_t n;
  int64_t blocksize;
  float codebook[KBIT_CODEBOOK4_SIZE];
  float pairs[256][2]; /* the two codebook values of each byte */
};

template <typename S>
void dequantize4_block(const Dequantize4Job& job, int64_t b) {
  const uint8_t* __restrict packed = job.packed;
  const float(*__restrict lut)[2] = job.pairs;
  int64_t start = b * job.blocksize;
  int64_t len = block_len(job.n, job.blocksize, b);
  float m = job.absmax[b];
  const uint8_t* __restrict src = packed + start / 2;
  /* Two passes per chunk: the table lookups (8 bytes copied per input byte), then the product
   * and the store (with its float16/bfloat16 rounding), which vectorize. */
  float buf[kQuantizeChunk];
  for (int64_t c = 0; c < len; c += kQuantizeChunk) {
    int64_t cnt = len - c < kQuantizeChunk ? len - c : kQuantizeChunk;
    int64_t bytes = (cnt + 1) / 2;
    for (int64_t j = 0; j < bytes; ++j) memcpy(buf + 2 * j, lut[src[c / 2 + j]], sizeof(float[2]));
    for (int64_t k = 0; k < cnt; ++k) S::store(job.out, start + c + k, buf[k] * m);
  }
}

template <typename S>
void dequantize4_range(void* ctx, int64_t first_block, int64_t end_block) {
  const Dequantize4Job& job = *static_cast<const Dequantize4Job*>(ctx);
  for (int64_t b = first_block; b < end_block; ++b) dequantize4_block<S>(job, b);
}

/* ---- AVX2 kernels: full blocks here, a partial last block in the portable code above ---- */

#if defined(KBIT_X86_AVX2)

KBIT_AVX2 inline uint32_t avx2_hmax_epu32(__m256i v) {
  __m128i x = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0x4e));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0xb1));
  return (uint32_t)_mm_cvtsi128_si32(x);
}

/* block_absmax over len values, len a multiple of 32: the same integer max of the magnitude bits. */
template <typename L, bool IGNORE_NAN>
KBIT_AVX2 float block_absmax_avx2(const void* A, int64_t start, int64_t len) {
  const __m256i mag = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  for (int64_t i = 0; i < len; i += 32) {
    __m256i u0 = _mm256_and_si256(_mm256_castps_si256(L::load8(A, start + i)), mag);
    __m256i u1 = _mm256_and_si256(_mm256_castps_si256(L::load8(A, start + i + 8)), mag);
    __m256i u2 = _mm256_and_si256(_mm256_castps_si256(L::load8(A, start + i + 16)), mag);
    __m256i u3 = _mm256_and_si256(_mm256_castps_si256(L::load8(A, start + i + 24)), mag);
    if (IGNORE_NAN) { /* magnitudes are non-negative int32: a signed compare orders them */
      u0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(u0, inf), u0);
      u1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(u1, inf), u1);
      u2 = _mm256_andnot_si256(_mm256_cmpgt_epi32(u2, inf), u2);
      u3 = _mm256_andnot_si256(_mm256_cmpgt_epi32(u3, inf), u3);
    }
    m0 = _mm256_max_epu32(m0, u0);
    m1 = _mm256_max_epu32(m1, u1);
    m2 = _mm256_max_epu32(m2, u2);
    m3 = _mm256_max_epu32(m3, u3);
  }
  return kbit_bits_f32(avx2_hmax_epu32(_mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3))));
}

/* Prefetch 32 values at element index i into L1. The quantize passes call it for the next block
 * while they work on this one (its absmax pass then reads cached lines: ~20% off blocks of 1024+
 * here, where the hardware prefetcher alone falls behind); a prefetch past the end never faults. */
template <typename L>
KBIT_AVX2 inline void avx2_prefetch32(const void* A, int64_t i) {
  const char* p = static_cast<const char*>(A) + i * L::kBytes;
  _mm_prefetch(p, _MM_HINT_T0);
  if (L::kBytes * 32 > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
}

/* Four vectors of uint8-valued int32 lanes (32 values in order) to 32 bytes in order. */
KBIT_AVX2 inline __m256i avx2_narrow8(__m256i a, __m256i b, __m256i c, __m256i d) {
  __m256i v = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* kbit_grid_bucket of x / m, then the table entry of that bucket (a 4-byte gather, low byte kept). */
KBIT_AVX2 inline __m256i avx2_grid_code(__m256 a, __m256 m, const uint8_t* table) {
  __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_div_ps(a, m), _mm256_set1_ps(1.0f)),
                                         _mm256_set1_ps(KBIT_GRID_HALF_SPAN)),
                           _mm256_set1_ps(0.5f));
  t = _mm256_max_ps(t, _mm256_setzero_ps()); /* maxps gives the second operand for NaN: t >= 0 ? t : 0 */
  t = _mm256_min_ps(t, _mm256_set1_ps((float)(KBIT_GRID_SIZE - 1)));
  __m256i j = _mm256_cvttps_epi32(t);
  __m256i g = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), j, 1);
  return _mm256_and_si256(g, _mm256_set1_epi32(0xff));
}

template <typename L>
KBIT_AVX2 void quantize_range_avx2(void* ctx, int64_t first_block, int64_t end_block) {
  const QuantizeJob& job = *static_cast<const QuantizeJob*>(ctx);
  const uint8_t* table = job.table;
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = block_len(job.n, job.blocksize, b);
    if (len % 32 != 0) {
      quantize_block<L>(job, b);
      continue;
    }
    float m = block_absmax_avx2<L, true>(job.A, start, len);
    job.absmax[b] = m;
    __m256 mv = _mm256_set1_ps(m);
    for (int64_t i = 0; i < len; i += 32) {
      avx2_prefetch32<L>(job.A, start + len + i);
      __m256i c0 = avx2_grid_code(L::load8(job.A, start + i), mv, table);
      __m256i c1 = avx2_grid_code(L::load8(job.A, start + i + 8), mv, table);
      __m256i c2 = avx2_grid_code(L::load8(job.A, start + i + 16), mv, table);
      __m256i c3 = avx2_grid_code(L::load8(job.A, start + i + 24), mv, table);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(job.out + start + i), avx2_narrow8(c0, c1, c2, c3));
    }
  }
}

/* The midpoints as the binary search reads them: level 1 compares with bounds[7]; level 2 with
 * bounds[r + 3] (r in {0, 8}); level 3 with bounds[r + 1] (r in {0, 4, 8, 12}); level 4 with
 * bounds[r] (r even). Each table is indexed by r shifted down to 0..7 (vpermps uses 3 bits). */
struct Rank4Tables {
  __m256 l1, l2, l3, l4;
};

KBIT_AVX2 inline __m256i avx2_rank4(__m256 x, const Rank4Tables& t) {
  /* !(x <= bound) with NaN true: _CMP_NLE_UQ, as kbit_quantize4_code counts */
  __m256i r = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, t.l1, _CMP_NLE_UQ)), _mm256_set1_epi32(8));
  __m256 bound = _mm256_permutevar8x32_ps(t.l2, _mm256_srli_epi32(r, 3));
  r = _mm256_add_epi32(r, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, bound, _CMP_NLE_UQ)),
                                           _mm256_set1_epi32(4)));
  bound = _mm256_permutevar8x32_ps(t.l3, _mm256_srli_epi32(r, 2));
  r = _mm256_add_epi32(r, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, bound, _CMP_NLE_UQ)),
                                           _mm256_set1_epi32(2)));
  bound = _mm256_permutevar8x32_ps(t.l4, _mm256_srli_epi32(r, 1));
  return _mm256_sub_epi32(r, _mm256_castps_si256(_mm256_cmp_ps(x, bound, _CMP_NLE_UQ))); /* mask is -1 */
}

template <typename L, int QT>
KBIT_AVX2 void quantize4_range_avx2(void* ctx, int64_t first_block, int64_t end_block) {
  const Quantize4Job& job = *static_cast<const Quantize4Job*>(ctx);
  float bounds[15];
  for (int k = 0; k < 15; ++k) bounds[k] = kbit_bound4(QT, k);
  Rank4Tables t;
  t.l1 = _mm256_set1_ps(bounds[7]);
  t.l2 = _mm256_setr_ps(bounds[3], bounds[11], 0, 0, 0, 0, 0, 0);
  t.l3 = _mm256_setr_ps(bounds[1], bounds[5], bounds[9], bounds[13], 0, 0, 0, 0);
  t.l4 = _mm256_setr_ps(bounds[0], bounds[2], bounds[4], bounds[6], bounds[8], bounds[10], bounds[12], bounds[14]);
  /* rank -> code: a byte shuffle (the identity for NF4) */
  uint64_t ranks = kbit_rank_table4(QT);
  alignas(16) uint8_t rank_code[16];
  for (int r = 0; r < 16; ++r) rank_code[r] = kbit_rank_to_code4(ranks, r);
  __m256i to_code = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(rank_code)));
  const __m256i pair = _mm256_set1_epi16(0x0110); /* byte 2k times 16 plus byte 2k+1 */
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = block_len(job.n, job.blocksize, b);
    if (len < job.blocksize) { /* partial: divides instead (kbit.h) and may need a padding nibble */
      quantize4_block<L, QT>(job, b);
      continue;
    }
    float m = block_absmax_avx2<L, false>(job.A, start, len);
    job.absmax[b] = m;
    __m256 inv = _mm256_set1_ps(1.0f / kbit_absmax4_scale(m));
    for (int64_t i = 0; i < len; i += 32) {
      avx2_prefetch32<L>(job.A, start + len + i);
      __m256i r0 = avx2_rank4(_mm256_mul_ps(L::load8(job.A, start + i), inv), t);
      __m256i r1 = avx2_rank4(_mm256_mul_ps(L::load8(job.A, start + i + 8), inv), t);
      __m256i r2 = avx2_rank4(_mm256_mul_ps(L::load8(job.A, start + i + 16), inv), t);
      __m256i r3 = avx2_rank4(_mm256_mul_ps(L::load8(job.A, start + i + 24), inv), t);
      __m256i codes = avx2_narrow8(r0, r1, r2, r3);
      if (QT != KBIT_QUANT_NF4) codes = _mm256_shuffle_epi8(to_code, codes);
      __m256i w = _mm256_maddubs_epi16(codes, pair);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(job.out + (start + i) / 2),
                       _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    }
  }
}

template <typename S>
KBIT_AVX2 inline void avx2_dequantize4_group(const Dequantize4Job& job, __m128i codes8, __m256 lo, __m256 hi,
                                             __m256 m, int64_t at) {
  __m256i idx = _mm256_cvtepu8_epi32(codes8);
  __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 picks the half */
  S::store8(job.out, at, _mm256_mul_ps(v, m));
}

template <typename S>
KBIT_AVX2 void dequantize4_range_avx2(void* ctx, int64_t first_block, int64_t end_block) {
  const Dequantize4Job& job = *static_cast<const Dequantize4Job*>(ctx);
  __m256 lo = _mm256_loadu_ps(job.codebook), hi = _mm256_loadu_ps(job.codebook + 8);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = block_len(job.n, job.blocksize, b);
    if (len % 32 != 0) {
      dequantize4_block<S>(job, b);
      continue;
    }
    __m256 m = _mm256_set1_ps(job.absmax[b]);
    for (int64_t i = 0; i < len; i += 32) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(job.packed + (start + i) / 2));
      __m128i first = _mm_and_si128(_mm_srli_epi16(v, 4), nibble), second = _mm_and_si128(v, nibble);
      __m128i c0 = _mm_unpacklo_epi8(first, second), c1 = _mm_unpackhi_epi8(first, second);
      avx2_dequantize4_group<S>(job, c0, lo, hi, m, start + i);
      avx2_dequantize4_group<S>(job, _mm_unpackhi_epi64(c0, c0), lo, hi, m, start + i + 8);
      avx2_dequantize4_group<S>(job, c1, lo, hi, m, start + i + 16);
      avx2_dequantize4_group<S>(job, _mm_unpackhi_epi64(c1, c1), lo, hi, m, start + i + 24);
    }
  }
}

#endif /* KBIT_X86_AVX2 */

/* The range function for dtype: Fn<LoadF32 or StoreF32 ...> picked by a table of three. */
template <typename F32, typename F16, typename BF16>
range_fn by_dtype(int dtype, F32 f32, F16 f16, BF16 bf16) {
  return dtype == KBIT_DTYPE_F32 ? f32 : dtype == KBIT_DTYPE_F16 ? f16 : bf16;
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" {

KBIT_API int kbit_abi_version(void) { return KBIT_ABI_VERSION; }

KBIT_API const char* kbit_last_path(void) { return cpu::tls_last_path; }

KBIT_API const char* kbit_status_string(int status) {
  const char* s = kbit_own_status_string(status);
  if (s != NULL) return s;
  if (status >= KBIT_STATUS_CUDA_BASE) return "CUDA error (not expected from the CPU library)";
  return "unknown kbit status";
}

KBIT_API int kbit_quantize_blockwise_8bit(int dtype, const void* A, const float* code, uint8_t* out, float* absmax,
                                          int64_t n, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_blockwise8(dtype, A, code, out, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  GridTable* grid = n >= kGridTableMinValues ? acquire_grid_table(code) : NULL; /* NULL: per-value search */
  QuantizeJob job = {A, code, grid != NULL ? grid->table : NULL, out, absmax, n, blocksize};
  int64_t blocks = (n + blocksize - 1) / blocksize;
  range_fn fn = by_dtype(dtype, quantize_range<LoadF32>, quantize_range<LoadF16>, quantize_range<LoadBF16>);
  const char* path = "kbit_quantize_blockwise_8bit:portable";
#if defined(KBIT_X86_AVX2)
  if (job.table != NULL && use_avx2()) {
    fn = by_dtype(dtype, quantize_range_avx2<LoadF32>, quantize_range_avx2<LoadF16>, quantize_range_avx2<LoadBF16>);
    path = "kbit_quantize_blockwise_8bit:avx2";
  }
#endif
  cpu::record_path(path);
  parallel_for(blocks, grain_for(blocksize), fn, &job);
  if (grid != NULL) release_grid_table(grid);
  return KBIT_OK;
}

KBIT_API int kbit_dequantize_blockwise_8bit(int dtype, const uint8_t* codes, const float* code, const float* absmax,
                                            void* out, int64_t n, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_blockwise8(dtype, out, code, codes, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  DequantizeJob job = {codes, code, absmax, out, n, blocksize};
  int64_t blocks = (n + blocksize - 1) / blocksize;
  /* No AVX2 variant: a gather of 8 codebook entries was slower here than 8 scalar loads. With
   * AVX-512 the whole codebook fits in 16 registers (lookup256). */
  range_fn fn = by_dtype(dtype, dequantize_range<StoreF32>, dequantize_range<StoreF16>, dequantize_range<StoreBF16>);
  const char* path = "kbit_dequantize_blockwise_8bit:portable";
#if defined(KBIT_X86_AVX2)
  if (cpu::simd_level() >= cpu::kSimdAvx512) {
    fn = by_dtype(dtype, dequantize_range_avx512<StoreF32>, dequantize_range_avx512<StoreF16>,
                  dequantize_range_avx512<StoreBF16>);
    path = "kbit_dequantize_blockwise_8bit:avx512";
  }
#endif
  cpu::record_path(path);
  parallel_for(blocks, grain_for(blocksize), fn, &job);
  return KBIT_OK;
}

KBIT_API int kbit_quantize_4bit(int dtype, int quant_type, const void* A, uint8_t* out, float* absmax, int64_t n,
                                int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_blockwise4(dtype, quant_type, A, out, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  Quantize4Job job;
  job.A = A;
  job.out = out;
  job.absmax = absmax;
  job.n = n;
  job.blocksize = blocksize;
  int64_t blocks = (n + blocksize - 1) / blocksize;
  range_fn fn;
  if (quant_type == KBIT_QUANT_NF4) {
    fn = by_dtype(dtype, quantize4_range<LoadF32, KBIT_QUANT_NF4>, quantize4_range<LoadF16, KBIT_QUANT_NF4>,
                  quantize4_range<LoadBF16, KBIT_QUANT_NF4>);
  } else {
    fn = by_dtype(dtype, quantize4_range<LoadF32, KBIT_QUANT_FP4>, quantize4_range<LoadF16, KBIT_QUANT_FP4>,
                  quantize4_range<LoadBF16, KBIT_QUANT_FP4>);
  }
  const char* path = "kbit_quantize_4bit:portable";
#if defined(KBIT_X86_AVX2)
  if (use_avx2()) {
    path = "kbit_quantize_4bit:avx2";
    if (quant_type == KBIT_QUANT_NF4) {
      fn = by_dtype(dtype, quantize4_range_avx2<LoadF32, KBIT_QUANT_NF4>,
                    quantize4_range_avx2<LoadF16, KBIT_QUANT_NF4>, quantize4_range_avx2<LoadBF16, KBIT_QUANT_NF4>);
    } else {
      fn = by_dtype(dtype, quantize4_range_avx2<LoadF32, KBIT_QUANT_FP4>,
                    quantize4_range_avx2<LoadF16, KBIT_QUANT_FP4>, quantize4_range_avx2<LoadBF16, KBIT_QUANT_FP4>);
    }
  }
#endif
  cpu::record_path(path);
  parallel_for(blocks, grain_for(blocksize), fn, &job);
  return KBIT_OK;
}

KBIT_API int kbit_dequantize_4bit(int dtype, int quant_type, const uint8_t* packed, const float* absmax, void* out,
                                  int64_t n, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_blockwise4(dtype, quant_type, out, packed, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  Dequantize4Job job;
  job.packed = packed;
  job.absmax = absmax;
  job.out = out;
  job.n = n;
  job.blocksize = blocksize;
  /* A cache of kbit_dequantize4_value's operand per byte: pair[v] * m is that function's product. */
  cpu::fill_code4_tables(quant_type, job.codebook, job.pairs);
  int64_t blocks = (n + blocksize - 1) / blocksize;
  range_fn fn =
      by_dtype(dtype, dequantize4_range<StoreF32>, dequantize4_range<StoreF16>, dequantize4_range<StoreBF16>);
  const char* path = "kbit_dequantize_4bit:portable";
#if defined(KBIT_X86_AVX2)
  if (use_avx2()) {
    fn = by_dtype(dtype, dequantize4_range_avx2<StoreF32>, dequantize4_range_avx2<StoreF16>,
                  dequantize4_range_avx2<StoreBF16>);
    path = "kbit_dequantize_4bit:avx2";
  }
#endif
  cpu::record_path(path);
  parallel_for(blocks, grain_for(blocksize), fn, &job);
  return KBIT_OK;
}

}  // extern "C"
