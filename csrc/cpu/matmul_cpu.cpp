/*
 * kbit_matmul_4bit on the host: out = A · W'^T (+ bias) for m_rows rows of A and a 4-bit (NF4/FP4)
 * weight, never materializing W'.
 *
 * The work is split over tiles of kTile weight rows (output columns); a thread owns whole tiles, so
 * the result does not depend on the thread count. Within a task, k is walked in chunks of kChunk
 * values: for each chunk and tile the tile's W' values are decoded once into a small buffer (16 KB at
 * most, L1/L2 resident), and a register-blocked microkernel multiplies every row of A's chunk with it
 * (tiles of up to 4 rows x 4 columns of vector accumulators); each chunk's sums are added, in chunk
 * order, to a float32 accumulator per output value. A's chunk (m_rows x kChunk) stays in cache while
 * the task's tiles pass over it. The whole weight is read from memory once per call.
 *
 * A is copied once into a zero-padded buffer (rows padded to a multiple of 32), as float32, or as
 * bfloat16 for the AVX-512-BF16 path; tiles are padded with zeros the same way, so the microkernels
 * have no tails.
 *
 * Paths, chosen at run time from CPUID (KBIT_CPU_SIMD=0 forces the portable one, =avx2 caps at AVX2):
 *   - AVX-512 (F, BW, VL): tiles decoded 32 values per step (nibbles to indices, one vpermps of the
 *     16-entry codebook scaled by the block's absmax: exactly kbit_dequantize4_value), float32 FMAs.
 *   - AVX-512-BF16, for bfloat16 inputs: the decoded W' rounded to bfloat16 (round to nearest even,
 *     as torch's cast; subnormals become 0) and vdpbf16ps, pairs of products accumulated in float32.
 *   - AVX2 + FMA: tiles decoded as the GEMV does, float32 FMAs, 8 lanes.
 *   - portable: the same blocking in plain loops.
 * When k_in is not a multiple of the blocksize (blocks straddle rows) tiles are decoded value by
 * value; the microkernels are the same.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KBIT_MATMUL_X86 1
#endif

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "cpu_dtype.h"
#include "cpu_features.h"
#include "parallel.h"

namespace kbit {
namespace {

const int64_t kTile = 4;     /* weight rows (output columns) per tile */
const int64_t kChunk = 2048; /* k values per chunk, at most (a multiple of kPad): bfloat16 tiles */
const int64_t kChunkF32 = 1024; /* float32 tiles: 16 KB */
const int64_t kPad = 64;     /* rows of A and of a tile are padded with zeros to a multiple of this */
const int64_t kRowBlock = 4; /* rows of A per microkernel call */
/* Bytes ahead the direct kernels prefetch their weight rows (measured best of 0.5-8 KB here). */
const int64_t kPrefetchBytes = 4096;
const int64_t kDirectRows = 4; /* up to this many rows of A, the AVX-512 path decodes into registers */
/* Bytes of A's rows the direct kernels keep in L1 per k chunk (at least 1024 values, a multiple of 64):
 * one row of 4096 float32 values is walked whole, weight row by weight row, for the prefetchers. */
const int64_t kDirectBytes = 16384;

using cpu::kAvx2;
using cpu::kAvx512;
using cpu::kAvx512Bf16;
using cpu::kPortable;

struct MatmulJob {
  int dtype;
  int path;
  const uint8_t* packed;
  const float* absmax;
  const void* bias;
  void* out;
  int64_t m, n, k, lda; /* lda: k rounded up to kPad */
  int32_t log2_bs;
  bool aligned;       /* k_in % blocksize == 0: every row of W starts a block (and a byte) */
  bool direct;        /* m <= kDirectRows on the AVX-512 path, aligned layout: direct_rows() */
  int64_t direct_chunk; /* k values per chunk of the direct kernels */
  int64_t group;      /* values are stored permuted within groups of this many (0: in order), see slot() */
  const void* Apad;   /* m x lda, float32 or (kAvx512Bf16) bfloat16 bits, zero padded */
  float* C;           /* m x n float32 sums */
  float codebook[KBIT_CODEBOOK4_SIZE];
};

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

/* W'[j][k] for any layout (blocks may straddle rows, rows may start at a low nibble). */
inline float weight_value(const MatmulJob& job, int64_t j, int64_t k) {
  int64_t pos = j * job.k + k;
  uint8_t byte = job.packed[pos >> 1];
  uint8_t c = (pos & 1) ? kbit_unpack4_second(byte) : kbit_unpack4_first(byte);
  return kbit_dequantize4_value(job.codebook, c, job.absmax[pos >> job.log2_bs]);
}

/* Where value t of a row (of A or of a tile) is stored. The AVX-512 paths decode a byte's two nibbles
 * into two different vectors, so within each group of G values (G = job.group: 32 for float32, 64
 * for bfloat16) the even-indexed values come first, then the odd ones; A is stored the same way, so
 * the products pair up as in the plain order (only the summation order differs). */
inline int64_t slot(int64_t group, int64_t t) {
  if (group == 0) return t;
  int64_t g = t / group * group, u = t - g;
  return g + ((u & 1) ? group / 2 : 0) + u / 2;
}

/* buf[r * ldb + slot(kk)] = W'[j0 + r][k0 + kk] for r < rows, kk < kc; zeros up to kTile rows and ldb. */
void decode_tile_scalar(const MatmulJob& job, int64_t j0, int64_t rows, int64_t k0, int64_t kc, int64_t ldb,
                        float* __restrict buf) {
  for (int64_t r = 0; r < kTile; ++r) {
    float* dst = buf + r * ldb;
    memset(dst, 0, (size_t)ldb * sizeof(float));
    if (r < rows) {
      for (int64_t kk = 0; kk < kc; ++kk) dst[slot(job.group, kk)] = weight_value(job, j0 + r, k0 + kk);
    }
  }
}

/* sums[i * kTile + r] = sum over kk < kc_pad of A[i][k0 + kk] * tile[r][kk], for i < rows. */
void micro_portable(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb, int64_t kc_pad,
                    int rows, float* __restrict sums) {
  for (int i = 0; i < rows; ++i) {
    for (int r = 0; r < kTile; ++r) {
      const float* a = A + i * lda;
      const float* b = B + r * ldb;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t kk = 0; kk < kc_pad; kk += 8)
        for (int t = 0; t < 8; ++t) acc[t] += a[kk + t] * b[kk + t];
      sums[i * kTile + r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

/* C[i][j + c] (+)= res[i * cols + c] for the direct kernels: the first chunk stores, the others add. */
inline void add_sums_direct(const MatmulJob& job, int rows, int64_t j, int cols, bool first, const float* res) {
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < cols; ++c) {
      float* dst = job.C + i * job.n + j + c;
      *dst = first ? res[i * cols + c] : *dst + res[i * cols + c];
    }
}

#if defined(KBIT_MATMUL_X86)
#define KBIT_AVX2 __attribute__((target("avx2,fma")))
#define KBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define KBIT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

/* Aligned layout: the 32 values at k0 + kk of row j are 16 whole bytes in one block. */
KBIT_AVX2 void decode_tile_avx2(const MatmulJob& job, int64_t j0, int64_t rows, int64_t k0, int64_t kc, int64_t ldb,
                                float* __restrict buf) {
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (int64_t r = 0; r < kTile; ++r) {
    float* dst = buf + r * ldb;
    if (r >= rows) {
      memset(dst, 0, (size_t)ldb * sizeof(float));
      continue;
    }
    int64_t start = (j0 + r) * job.k + k0;
    const uint8_t* src = job.packed + (start >> 1);
    int64_t kk = 0;
    for (; kk + 32 <= kc; kk += 32) {
      float m = job.absmax[(start + kk) >> job.log2_bs];
      __m256 vm = _mm256_set1_ps(m);
      __m256 lo8 = _mm256_mul_ps(_mm256_loadu_ps(job.codebook), vm), hi8 = _mm256_mul_ps(_mm256_loadu_ps(job.codebook + 8), vm);
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kk / 2));
      __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
      __m128i c0 = _mm_unpacklo_epi8(h, l), c1 = _mm_unpackhi_epi8(h, l);
      _mm256_storeu_ps(dst + kk, cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(c0)));
      _mm256_storeu_ps(dst + kk + 8, cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8))));
      _mm256_storeu_ps(dst + kk + 16, cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(c1)));
      _mm256_storeu_ps(dst + kk + 24, cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8))));
    }
    for (; kk < kc; ++kk) dst[kk] = weight_value(job, j0 + r, k0 + kk);
    for (; kk < ldb; ++kk) dst[kk] = 0.0f;
  }
}

KBIT_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* Two rows of A at a time: 8 accumulators of 8 lanes. */
template <int ROWS>
KBIT_AVX2 void micro_avx2_rows(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                               int64_t kc_pad, float* __restrict sums) {
  __m256 acc[ROWS][kTile];
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < kc_pad; kk += 8) {
    __m256 b[kTile];
    for (int r = 0; r < kTile; ++r) b[r] = _mm256_loadu_ps(B + r * ldb + kk);
    for (int i = 0; i < ROWS; ++i) {
      __m256 a = _mm256_loadu_ps(A + i * lda + kk);
      for (int r = 0; r < kTile; ++r) acc[i][r] = _mm256_fmadd_ps(a, b[r], acc[i][r]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) sums[i * kTile + r] = hsum_avx2(acc[i][r]);
}

KBIT_AVX2 void micro_avx2(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kc_pad, int rows,
                          float* sums) {
  int i = 0;
  for (; i + 2 <= rows; i += 2) micro_avx2_rows<2>(A + i * lda, lda, B, ldb, kc_pad, sums + i * kTile);
  if (i < rows) micro_avx2_rows<1>(A + i * lda, lda, B, ldb, kc_pad, sums + i * kTile);
}

/* The 32 values of 16 bytes: w0 the high nibbles (even values), w1 the low ones (odd values), each
 * looked up in the codebook scaled by the block's absmax (one vpermps: exactly codebook * absmax). */
KBIT_AVX512 inline void decode32_avx512(const uint8_t* src, __m512 scaled, __m512& w0, __m512& w1) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  w0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), scaled);
  w1 = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), scaled);
}

KBIT_AVX512 void decode_tile_avx512(const MatmulJob& job, int64_t j0, int64_t rows, int64_t k0, int64_t kc,
                                    int64_t ldb, float* __restrict buf) {
  const __m512 code = _mm512_loadu_ps(job.codebook);
  for (int64_t r = 0; r < kTile; ++r) {
    float* dst = buf + r * ldb;
    if (r >= rows) {
      memset(dst, 0, (size_t)ldb * sizeof(float));
      continue;
    }
    int64_t start = (j0 + r) * job.k + k0;
    const uint8_t* src = job.packed + (start >> 1);
    int64_t kk = 0;
    for (; kk + 32 <= kc; kk += 32) {
      __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(job.absmax[(start + kk) >> job.log2_bs]));
      __m512 w0, w1;
      _mm_prefetch(reinterpret_cast<const char*>(src + kk / 2 + kTile * job.k / 2), _MM_HINT_T0); /* next tile */
      decode32_avx512(src + kk / 2, scaled, w0, w1);
      _mm512_storeu_ps(dst + kk, w0);
      _mm512_storeu_ps(dst + kk + 16, w1);
    }
    for (int64_t t = kk; t < ldb; ++t) dst[t] = 0.0f; /* aligned: kc is a multiple of 32 */
  }
}

template <int ROWS>
KBIT_AVX512 void micro_avx512_rows(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                                   int64_t kc_pad, float* __restrict sums) {
  __m512 acc[ROWS][kTile];
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc_pad; kk += 16) {
    __m512 b[kTile];
    for (int r = 0; r < kTile; ++r) b[r] = _mm512_loadu_ps(B + r * ldb + kk);
    for (int i = 0; i < ROWS; ++i) {
      __m512 a = _mm512_loadu_ps(A + i * lda + kk);
      for (int r = 0; r < kTile; ++r) acc[i][r] = _mm512_fmadd_ps(a, b[r], acc[i][r]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) sums[i * kTile + r] = _mm512_reduce_add_ps(acc[i][r]);
}

KBIT_AVX512 void micro_avx512(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kc_pad, int rows,
                              float* sums) {
  switch (rows) {
    case 4: micro_avx512_rows<4>(A, lda, B, ldb, kc_pad, sums); break;
    case 3: micro_avx512_rows<3>(A, lda, B, ldb, kc_pad, sums); break;
    case 2: micro_avx512_rows<2>(A, lda, B, ldb, kc_pad, sums); break;
    default: micro_avx512_rows<1>(A, lda, B, ldb, kc_pad, sums); break;
  }
}

/* A few rows of A (m_rows <= kDirectRows), aligned layout: no tile buffer. Each step decodes 32
 * values of COLS weight rows into registers and multiplies them with every row of A; the whole of k
 * in one pass. res[i * COLS + c] = sum_k A[i][k] * W'[j + c][k]. */
template <int ROWS, int COLS>
KBIT_AVX512 void direct_avx512(const MatmulJob& job, int64_t j, int64_t k0, int64_t k1, float* __restrict res) {
  const __m512 code = _mm512_loadu_ps(job.codebook);
  const float* __restrict A = static_cast<const float*>(job.Apad);
  __m512 acc[ROWS][COLS][2];
  for (int i = 0; i < ROWS; ++i)
    for (int c = 0; c < COLS; ++c) acc[i][c][0] = acc[i][c][1] = _mm512_setzero_ps();
  const int64_t start = j * job.k;
  for (int64_t k = k0; k < k1; k += 32) {
    __m512 w[COLS][2];
    for (int c = 0; c < COLS; ++c) {
      int64_t pos = start + c * job.k + k;
      __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(job.absmax[pos >> job.log2_bs]));
      _mm_prefetch(reinterpret_cast<const char*>(job.packed + (pos >> 1) + kPrefetchBytes), _MM_HINT_T0);
      decode32_avx512(job.packed + (pos >> 1), scaled, w[c][0], w[c][1]);
    }
    for (int i = 0; i < ROWS; ++i) {
      __m512 a0 = _mm512_loadu_ps(A + i * job.lda + k), a1 = _mm512_loadu_ps(A + i * job.lda + k + 16);
      for (int c = 0; c < COLS; ++c) {
        acc[i][c][0] = _mm512_fmadd_ps(a0, w[c][0], acc[i][c][0]);
        acc[i][c][1] = _mm512_fmadd_ps(a1, w[c][1], acc[i][c][1]);
      }
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int c = 0; c < COLS; ++c) res[i * COLS + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][c][0], acc[i][c][1]));
}

/* The task's columns, k in chunks of job.direct_chunk (A's chunk stays in L1 while the columns pass);
 * each chunk's sums are added to C in chunk order. */
template <int ROWS>
KBIT_AVX512 void direct_tiles(const MatmulJob& job, int64_t t0, int64_t t1) {
  float res[ROWS * 2];
  for (int64_t k0 = 0; k0 < job.k; k0 += job.direct_chunk) {
    int64_t k1 = job.k - k0 < job.direct_chunk ? job.k : k0 + job.direct_chunk;
    for (int64_t j = t0 * kTile; j < job.n && j < t1 * kTile;) {
      int cols = job.n - j >= 2 ? 2 : 1;
      if (cols == 2) direct_avx512<ROWS, 2>(job, j, k0, k1, res);
      else direct_avx512<ROWS, 1>(job, j, k0, k1, res);
      add_sums_direct(job, ROWS, j, cols, k0 == 0, res);
      j += cols;
    }
  }
}

KBIT_AVX512 void direct_rows(const MatmulJob& job, int64_t t0, int64_t t1) {
  switch (job.m) {
    case 4: direct_tiles<4>(job, t0, t1); break;
    case 3: direct_tiles<3>(job, t0, t1); break;
    case 2: direct_tiles<2>(job, t0, t1); break;
    default: direct_tiles<1>(job, t0, t1); break;
  }
}

/* bfloat16 tiles, 64 values (32 bytes) per step: the byte values widened to 16-bit lanes, their
 * nibbles looked up with vpermw in a 32-entry table of bfloat16 values: the codebook times the absmax
 * of the block of the group's first 32 values (entries 0-15), and of its last 32 (16-31; the same
 * block unless blocksize is 32), each product rounded once to bfloat16. Lane u < 32 of w0 is value 2u
 * of the group, of w1 value 2u + 1 (slot()), so lanes 16-31 index the second half of the table. */
template <bool TWO_BLOCKS>
KBIT_AVX512BF16 inline __m512i bf16_table(const MatmulJob& job, __m512 code, int64_t pos) {
  __m512 a = _mm512_mul_ps(code, _mm512_set1_ps(job.absmax[pos >> job.log2_bs]));
  __m512 b = TWO_BLOCKS ? _mm512_mul_ps(code, _mm512_set1_ps(job.absmax[(pos + 32) >> job.log2_bs])) : a;
  return (__m512i)_mm512_cvtne2ps_pbh(b, a);
}

/* The 64 values of 32 bytes through the table: w0 the high nibbles (even values), w1 the low ones. */
KBIT_AVX512BF16 inline void decode64_bf16(const uint8_t* src, __m512i table, __m512i& w0, __m512i& w1) {
  const __m512i half = _mm512_set_epi64(0x0010001000100010LL, 0x0010001000100010LL, 0x0010001000100010LL,
                                        0x0010001000100010LL, 0, 0, 0, 0);
  __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  w0 = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(b, 4), half), table);
  w1 = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi16(15)), half), table);
}

KBIT_AVX512BF16 void decode_tile_bf16(const MatmulJob& job, int64_t j0, int64_t rows, int64_t k0, int64_t kc,
                                      int64_t ldb, uint16_t* __restrict buf) {
  const __m512 code = _mm512_loadu_ps(job.codebook);
  for (int64_t r = 0; r < kTile; ++r) {
    uint16_t* dst = buf + r * ldb;
    if (r >= rows) {
      memset(dst, 0, (size_t)ldb * sizeof(uint16_t));
      continue;
    }
    int64_t kk = 0;
    if (job.aligned) {
      int64_t start = (j0 + r) * job.k + k0;
      const uint8_t* src = job.packed + (start >> 1);
      for (; kk + 64 <= kc; kk += 64) {
        __m512i w0, w1;
        _mm_prefetch(reinterpret_cast<const char*>(src + kk / 2 + kTile * job.k / 2), _MM_HINT_T0); /* next tile */
        decode64_bf16(src + kk / 2, bf16_table<true>(job, code, start + kk), w0, w1);
        _mm512_storeu_si512(dst + kk, w0);
        _mm512_storeu_si512(dst + kk + 32, w1);
      }
    }
    for (; kk < ldb; kk += 64) { /* value by value (blocks straddle rows, or the chunk's tail), zero padded */
      alignas(64) float tmp[64];
      for (int64_t t = 0; t < 64; ++t) tmp[slot(64, t)] = kk + t < kc ? weight_value(job, j0 + r, k0 + kk + t) : 0.0f;
      _mm512_storeu_si512(dst + kk, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(tmp + 16), _mm512_load_ps(tmp)));
      _mm512_storeu_si512(dst + kk + 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(tmp + 48), _mm512_load_ps(tmp + 32)));
    }
  }
}

/* As direct_avx512, for bfloat16: 64 values per step decoded with vpermw (decode64_bf16), vdpbf16ps. */
template <int ROWS, int COLS, bool TWO_BLOCKS>
KBIT_AVX512BF16 void direct_bf16(const MatmulJob& job, int64_t j, int64_t k0, int64_t k1, float* __restrict res) {
  const __m512 code = _mm512_loadu_ps(job.codebook);
  const uint16_t* __restrict A = static_cast<const uint16_t*>(job.Apad);
  __m512 acc[ROWS][COLS][2];
  for (int i = 0; i < ROWS; ++i)
    for (int c = 0; c < COLS; ++c) acc[i][c][0] = acc[i][c][1] = _mm512_setzero_ps();
  const int64_t start = j * job.k;
  /* Software-pipelined: the next step's weights are decoded before this step's products, so the
   * decode's long dependency chain overlaps the dot products instead of stalling them. */
  __m512bh w[COLS][2], next[COLS][2];
  auto decode = [&](int64_t k, __m512bh (&dst)[COLS][2]) KBIT_AVX512BF16 {
    for (int c = 0; c < COLS; ++c) {
      int64_t pos = start + c * job.k + k;
      __m512i w0, w1;
      _mm_prefetch(reinterpret_cast<const char*>(job.packed + (pos >> 1) + kPrefetchBytes), _MM_HINT_T0);
      decode64_bf16(job.packed + (pos >> 1), bf16_table<TWO_BLOCKS>(job, code, pos), w0, w1);
      dst[c][0] = (__m512bh)w0;
      dst[c][1] = (__m512bh)w1;
    }
  };
  decode(k0, next);
  for (int64_t k = k0; k < k1; k += 64) {
    for (int c = 0; c < COLS; ++c) w[c][0] = next[c][0], w[c][1] = next[c][1];
    if (k + 64 < k1) decode(k + 64, next);
    for (int i = 0; i < ROWS; ++i) {
      __m512bh a0 = (__m512bh)_mm512_loadu_si512(A + i * job.lda + k);
      __m512bh a1 = (__m512bh)_mm512_loadu_si512(A + i * job.lda + k + 32);
      for (int c = 0; c < COLS; ++c) {
        acc[i][c][0] = _mm512_dpbf16_ps(acc[i][c][0], a0, w[c][0]);
        acc[i][c][1] = _mm512_dpbf16_ps(acc[i][c][1], a1, w[c][1]);
      }
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int c = 0; c < COLS; ++c) res[i * COLS + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][c][0], acc[i][c][1]));
}

template <int ROWS, bool TWO_BLOCKS>
KBIT_AVX512BF16 void direct_tiles_bf16(const MatmulJob& job, int64_t t0, int64_t t1) {
  float res[ROWS * 2];
  for (int64_t k0 = 0; k0 < job.k; k0 += job.direct_chunk) {
    int64_t k1 = job.k - k0 < job.direct_chunk ? job.k : k0 + job.direct_chunk;
    for (int64_t j = t0 * kTile; j < job.n && j < t1 * kTile;) {
      int cols = job.n - j >= 2 ? 2 : 1;
      if (cols == 2) direct_bf16<ROWS, 2, TWO_BLOCKS>(job, j, k0, k1, res);
      else direct_bf16<ROWS, 1, TWO_BLOCKS>(job, j, k0, k1, res);
      add_sums_direct(job, ROWS, j, cols, k0 == 0, res);
      j += cols;
    }
  }
}

template <bool TWO_BLOCKS>
KBIT_AVX512BF16 void direct_rows_bf16_bs(const MatmulJob& job, int64_t t0, int64_t t1) {
  switch (job.m) {
    case 4: direct_tiles_bf16<4, TWO_BLOCKS>(job, t0, t1); break;
    case 3: direct_tiles_bf16<3, TWO_BLOCKS>(job, t0, t1); break;
    case 2: direct_tiles_bf16<2, TWO_BLOCKS>(job, t0, t1); break;
    default: direct_tiles_bf16<1, TWO_BLOCKS>(job, t0, t1); break;
  }
}

KBIT_AVX512BF16 void direct_rows_bf16(const MatmulJob& job, int64_t t0, int64_t t1) {
  if (job.log2_bs == 5) direct_rows_bf16_bs<true>(job, t0, t1);
  else direct_rows_bf16_bs<false>(job, t0, t1);
}

template <int ROWS>
KBIT_AVX512BF16 void micro_bf16_rows(const uint16_t* __restrict A, int64_t lda, const uint16_t* __restrict B,
                                     int64_t ldb, int64_t kc_pad, float* __restrict sums) {
  __m512 acc[ROWS][kTile];
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc_pad; kk += 32) {
    __m512bh b[kTile];
    for (int r = 0; r < kTile; ++r) b[r] = (__m512bh)_mm512_loadu_si512(B + r * ldb + kk);
    for (int i = 0; i < ROWS; ++i) {
      __m512bh a = (__m512bh)_mm512_loadu_si512(A + i * lda + kk);
      for (int r = 0; r < kTile; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], a, b[r]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < kTile; ++r) sums[i * kTile + r] = _mm512_reduce_add_ps(acc[i][r]);
}

KBIT_AVX512BF16 void micro_bf16(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t kc_pad,
                                int rows, float* sums) {
  switch (rows) {
    case 4: micro_bf16_rows<4>(A, lda, B, ldb, kc_pad, sums); break;
    case 3: micro_bf16_rows<3>(A, lda, B, ldb, kc_pad, sums); break;
    case 2: micro_bf16_rows<2>(A, lda, B, ldb, kc_pad, sums); break;
    default: micro_bf16_rows<1>(A, lda, B, ldb, kc_pad, sums); break;
  }
}
#endif /* KBIT_MATMUL_X86 */

/* C[i][j0 + r] (+)= sums for a tile: the first chunk stores, the others add. */
inline void add_sums(const MatmulJob& job, int64_t i0, int rows, int64_t j0, int64_t cols, bool first,
                     const float* sums) {
  for (int i = 0; i < rows; ++i) {
    float* c = job.C + (i0 + i) * job.n + j0;
    for (int64_t r = 0; r < cols; ++r) c[r] = first ? sums[i * kTile + r] : c[r] + sums[i * kTile + r];
  }
}

void matmul_tiles(void* ctx, int64_t t0, int64_t t1) {
  const MatmulJob& job = *static_cast<const MatmulJob*>(ctx);
  float sums[kRowBlock * kTile];
  alignas(64) float fbuf[kTile * kChunkF32];
#if defined(KBIT_MATMUL_X86)
  alignas(64) uint16_t hbuf[kTile * kChunk];
  if (job.direct) {
    if (job.path == kAvx512Bf16) direct_rows_bf16(job, t0, t1);
    else direct_rows(job, t0, t1);
  }
  const int64_t chunk = job.path == kAvx512Bf16 ? kChunk : kChunkF32;
  for (int64_t k0 = 0; k0 < job.k && !job.direct; k0 += chunk) {
#else
  const int64_t chunk = kChunkF32;
  for (int64_t k0 = 0; k0 < job.k; k0 += chunk) {
#endif
    int64_t kc = job.k - k0 < chunk ? job.k - k0 : chunk;
    int64_t kc_pad = round_up(kc, kPad);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t j0 = t * kTile, cols = job.n - j0 < kTile ? job.n - j0 : kTile;
#if defined(KBIT_MATMUL_X86)
      if (job.path == kAvx512Bf16) {
        decode_tile_bf16(job, j0, cols, k0, kc, kc_pad, hbuf);
        const uint16_t* A = static_cast<const uint16_t*>(job.Apad) + k0;
        for (int64_t i = 0; i < job.m; i += kRowBlock) {
          int rows = (int)(job.m - i < kRowBlock ? job.m - i : kRowBlock);
          micro_bf16(A + i * job.lda, job.lda, hbuf, kc_pad, kc_pad, rows, sums);
          add_sums(job, i, rows, j0, cols, k0 == 0, sums);
        }
        continue;
      }
      if (job.path == kAvx512) {
        if (job.aligned) decode_tile_avx512(job, j0, cols, k0, kc, kc_pad, fbuf);
        else decode_tile_scalar(job, j0, cols, k0, kc, kc_pad, fbuf);
      } else if (job.path == kAvx2) {
        if (job.aligned) decode_tile_avx2(job, j0, cols, k0, kc, kc_pad, fbuf);
        else decode_tile_scalar(job, j0, cols, k0, kc, kc_pad, fbuf);
      } else {
        decode_tile_scalar(job, j0, cols, k0, kc, kc_pad, fbuf);
      }
#else
      decode_tile_scalar(job, j0, cols, k0, kc, kc_pad, fbuf);
#endif
      const float* A = static_cast<const float*>(job.Apad) + k0;
      for (int64_t i = 0; i < job.m; i += kRowBlock) {
        int rows = (int)(job.m - i < kRowBlock ? job.m - i : kRowBlock);
#if defined(KBIT_MATMUL_X86)
        if (job.path == kAvx512) micro_avx512(A + i * job.lda, job.lda, fbuf, kc_pad, kc_pad, rows, sums);
        else if (job.path == kAvx2) micro_avx2(A + i * job.lda, job.lda, fbuf, kc_pad, kc_pad, rows, sums);
        else micro_portable(A + i * job.lda, job.lda, fbuf, kc_pad, kc_pad, rows, sums);
#else
        micro_portable(A + i * job.lda, job.lda, fbuf, kc_pad, kc_pad, rows, sums);
#endif
        add_sums(job, i, rows, j0, cols, k0 == 0, sums);
      }
    }
  }
  /* out = C (+ bias), rounded once to the dtype. */
  for (int64_t i = 0; i < job.m; ++i) {
    for (int64_t j = t0 * kTile; j < job.n && j < t1 * kTile; ++j) {
      float v = job.k > 0 ? job.C[i * job.n + j] : 0.0f;
      if (job.bias != NULL) v += cpu::load_dtype(job.dtype, job.bias, j);
      cpu::store_dtype(job.dtype, job.out, i * job.n + j, v);
    }
  }
}

/* kbit_last_path()'s name of a kernel (kbit.h). */
const char* path_name(int path, bool direct) {
  switch (path) {
    case kAvx512Bf16: return direct ? "kbit_matmul_4bit:avx512bf16-direct" : "kbit_matmul_4bit:avx512bf16";
    case kAvx512: return direct ? "kbit_matmul_4bit:avx512-direct" : "kbit_matmul_4bit:avx512";
    case kAvx2: return "kbit_matmul_4bit:avx2";
    default: return "kbit_matmul_4bit:portable";
  }
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" KBIT_API int kbit_matmul_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                         const float* absmax, const void* bias, void* out, int64_t m_rows,
                                         int64_t n_out, int64_t k_in, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_matmul4(dtype, quant_type, A, packed, absmax, out, m_rows, n_out, k_in, blocksize);
  if (status != KBIT_OK || m_rows == 0 || n_out == 0) return status;
  MatmulJob job;
  job.dtype = dtype;
  job.path = cpu::matmul_path(dtype);
  job.packed = packed;
  job.absmax = absmax;
  job.bias = bias;
  job.out = out;
  job.m = m_rows;
  job.n = n_out;
  job.k = k_in;
  job.lda = round_up(k_in, kPad);
  job.log2_bs = log2_pow2(blocksize);
  job.aligned = k_in % blocksize == 0;
  job.direct = (job.path == kAvx512 || (job.path == kAvx512Bf16 && k_in % 64 == 0)) && job.aligned &&
               m_rows <= kDirectRows;
  job.group = job.path == kAvx512Bf16 ? 64 : job.path == kAvx512 ? 32 : 0;
  {
    int64_t elem = job.path == kAvx512Bf16 ? 2 : 4;
    int64_t chunk = kDirectBytes / (elem * (m_rows > 0 ? m_rows : 1)) / 64 * 64;
    job.direct_chunk = chunk < 1024 ? 1024 : chunk;
  }
  for (int c = 0; c < KBIT_CODEBOOK4_SIZE; ++c) job.codebook[c] = kbit_code4_value(quant_type, c);
  cpu::record_path(path_name(job.path, job.direct));
  job.Apad = NULL;
  job.C = NULL;
  void* apad = NULL;
  if (k_in > 0) {
    size_t elem = job.path == kAvx512Bf16 ? sizeof(uint16_t) : sizeof(float);
    if ((uint64_t)m_rows > SIZE_MAX / elem / (uint64_t)job.lda || (uint64_t)m_rows > SIZE_MAX / sizeof(float) / (uint64_t)n_out)
      return KBIT_ERR_TOO_LARGE;
    apad = aligned_alloc(64, round_up((int64_t)((size_t)m_rows * job.lda * elem), 64));
    job.C = static_cast<float*>(malloc((size_t)m_rows * n_out * sizeof(float)));
    if (apad == NULL || job.C == NULL) {
      free(apad);
      free(job.C);
      return KBIT_ERR_OUT_OF_MEMORY;
    }
    for (int64_t i = 0; i < m_rows; ++i) {
      if (job.path == kAvx512Bf16) { /* bfloat16 input, kept as it is */
        uint16_t* dst = static_cast<uint16_t*>(apad) + i * job.lda;
        const uint16_t* src = static_cast<const uint16_t*>(A) + i * k_in;
        memset(dst, 0, (size_t)job.lda * sizeof(uint16_t));
        for (int64_t k = 0; k < k_in; ++k) dst[slot(job.group, k)] = src[k];
      } else {
        float* dst = static_cast<float*>(apad) + i * job.lda;
        memset(dst, 0, (size_t)job.lda * sizeof(float));
        for (int64_t k = 0; k < k_in; ++k) dst[slot(job.group, k)] = cpu::load_dtype(dtype, A, i * k_in + k);
      }
    }
    job.Apad = apad;
  }
  /* Tiles per task: enough work to amortize a task (>= 2^16 weight values), and about 8 tasks per
   * thread so a late thread takes fewer. */
  int64_t tiles = (n_out + kTile - 1) / kTile;
  int64_t threads = cpu_thread_count();
  int64_t per_tile = kTile * (k_in > 0 ? k_in : 1) * (m_rows < 16 ? 1 : m_rows / 16);
  int64_t grain = (int64_t)1 << 16;
  grain = (grain + per_tile - 1) / per_tile;
  int64_t spread = (tiles + threads * 8 - 1) / (threads * 8);
  if (grain < spread) grain = spread;
  parallel_for(tiles, grain, matmul_tiles, &job);
  free(apad);
  free(job.C);
  return KBIT_OK;
}
