/*
 * The CPU layout of a 4-bit weight and its matmul (kbit.h defines the layout):
 * kbit_repack_4bit_tiled and kbit_matmul_4bit_tiled.
 *
 * bitsandbytes' layout keeps each weight row's codes together, so a kernel decodes one output column
 * at a time and ends every column with a horizontal sum. The tiled layout interleaves 64 output
 * columns: the 64 bytes of one k pair of a group are one cache line, byte c holding column c's codes
 * of k = 2p (low nibble) and 2p + 1 (high nibble). One 64-byte load feeds all 64 columns: dword i
 * holds columns 4i..4i+3, so vector v (lane i = column 4i + v) takes byte v of every dword, a row of
 * A is broadcast, and the only reduction is along k inside each lane: no horizontal sums, no
 * shuffles of A, and the scales are stored in this lane order.
 *
 * Paths (KBIT_CPU_SIMD=0 forces the portable one, =avx2 caps at AVX2, =avx512 leaves out VBMI):
 *   - AVX-512 (F, BW, VL): vpermps of d >> 8v looks up the low nibble (it reads index bits 0-3 only),
 *     of d >> (8v + 4) the high one, in the 16-entry codebook; times the columns' absmax: exactly
 *     kbit_dequantize4_value's W'. float32 FMAs, up to 4 rows of A a pass (two groups for one row).
 *   - AVX-512-BF16, bfloat16 inputs: each dword lane becomes the word pair (low nibble, high nibble)
 *     of its column (vpmultishiftqb with VBMI, else a shift and a word blend; vpermw reads index bits
 *     0-4 only and its 32-entry table repeats the 16 bfloat16 codes), so one vpermw gives the 32
 *     bfloat16 codes of 16 columns x 2 k values and vdpbf16ps multiplies them with A's bfloat16 pair (a
 *     broadcast dword); each block's float32 sum is then multiplied by its absmax. The codebook is
 *     rounded to bfloat16, the absmax is not. 8 rows x 2 vectors, or 4 x 4, a pass; a later pass over
 *     the group (from cache) prefetches the next group's lines.
 *   - AVX2 + FMA: the float32 kernel in 8 lanes (kbit's two-register codebook lookup).
 *   - portable: the same order in plain loops.
 * The float32 sums go to a small buffer per task; the epilogue adds the bias and rounds them to the
 * dtype (AVX-512: 16 at a time, kbit_f32_to_bf16's rounding). Threads take whole (group, row chunk)
 * tasks: every output value is one task's, summed in one order, so the result depends neither on the
 * thread count nor on m_rows.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KBIT_TILED_X86 1
#endif

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "cpu_dtype.h"
#include "cpu_features.h"
#include "parallel.h"

namespace kbit {
namespace {

const int64_t kGroup = KBIT_TILED4_GROUP; /* output columns per group: 64 */
const int64_t kSub = 16;                  /* columns per vector (a sub-tile) */
const int64_t kRowChunk = 16;             /* rows of A per task, at most */
const int64_t kPrefetchBytes = 4096; /* the next lines of a group prefetched this far ahead (measured best of 0-16 KB) */

using cpu::kAvx2;
using cpu::kAvx512;
using cpu::kAvx512Bf16;
using cpu::kPortable;

struct TiledJob {
  int dtype;
  int path;
  const void* A; /* float32 (lda = k) for the float paths, the caller's bfloat16 for kAvx512Bf16 */
  const uint8_t* tiled;
  const float* scales;
  const void* bias;
  void* out;
  int64_t m, n, k, groups, blocks, pairs_per_block, row_chunks, per_task;
  bool vbmi; /* kAvx512Bf16 with AVX-512-VBMI: vpmultishiftqb picks the nibbles */
  float codebook[KBIT_CODEBOOK4_SIZE];
  uint16_t table_bf16[32]; /* bfloat16(codebook[i & 15]) */
};

/* Group g's 64 bytes of pair p, and its 64 scales of block b (in lane order: lane_column()). */
inline const uint8_t* pair_bytes(const TiledJob& job, int64_t g, int64_t p) {
  return job.tiled + (g * (job.k / 2) + p) * kGroup;
}
inline const float* block_scales(const TiledJob& job, int64_t g, int64_t b) {
  return job.scales + (g * job.blocks + b) * kGroup;
}

/* The column (within its group) of lane i of vector v: byte v of the line's dword i. */
inline int64_t lane_column(int64_t v, int64_t i) { return 4 * i + v; }

/* The task's float32 sums: tile[(h * kRowChunk + i % kRowChunk) * kGroup + c] for row i of A and
 * column c of the task's group h, in column order; finish() adds the bias and rounds them to the dtype. */
inline void put_lanes(float* tile, int64_t i, int64_t h, int64_t v, const float* sums, int64_t first, int64_t count) {
  float* row = tile + (h * kRowChunk + i % kRowChunk) * kGroup;
  for (int64_t lane = first; lane < first + count; ++lane) row[lane_column(v, lane)] = sums[lane];
}
inline void put_vector(float* tile, int64_t i, int64_t h, int64_t v, const float* sums) {
  put_lanes(tile, i, h, v, sums, 0, kSub);
}

/* Rows [i0, i0 + rows) of group g, plain loops in the vector paths' order (lane by lane). */
void group_portable(const TiledJob& job, int64_t g, int h, int64_t i0, int64_t rows, float* tile) {
  const float* A = static_cast<const float*>(job.A);
  for (int64_t i = i0; i < i0 + rows; ++i) {
    for (int64_t v = 0; v < 4; ++v) {
      float acc[kSub];
      for (int64_t lane = 0; lane < kSub; ++lane) acc[lane] = 0.0f;
      for (int64_t b = 0; b < job.blocks; ++b) {
        const float* s = block_scales(job, g, b) + kSub * v;
        for (int64_t p = b * job.pairs_per_block; p < (b + 1) * job.pairs_per_block; ++p) {
          const uint8_t* q = pair_bytes(job, g, p);
          float a0 = A[i * job.k + 2 * p], a1 = A[i * job.k + 2 * p + 1];
          for (int64_t lane = 0; lane < kSub; ++lane) {
            uint8_t byte = q[lane_column(v, lane)];
            acc[lane] += a0 * (job.codebook[byte & 15] * s[lane]);
            acc[lane] += a1 * (job.codebook[byte >> 4] * s[lane]);
          }
        }
      }
      put_vector(tile, i, h, v, acc);
    }
  }
}

#if defined(KBIT_TILED_X86)
#define KBIT_AVX2 __attribute__((target("avx2,fma")))
#define KBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define KBIT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

/* R rows from i0, groups [g, g + G): acc[h][r][v] lane i is column lane_column(v, i) of group g + h
 * (two groups for a single row: twice the independent sums). One 64-byte load a pair: dword i holds
 * the bytes of columns 4i..4i+3, so d >> 8v has column 4i+v's codes in its low bits (vpermps reads
 * index bits 0-3: the low nibble; >> 4 more: the high one). */
template <int R, int G>
KBIT_AVX512 void group_avx512(const TiledJob& job, int64_t g, int64_t i0, float* tile) {
  const __m512 code = _mm512_loadu_ps(job.codebook);
  const float* A = static_cast<const float*>(job.A) + i0 * job.k;
  __m512 acc[G][R][4];
  for (int h = 0; h < G; ++h)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) acc[h][r][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < job.blocks; ++b) {
    __m512 s[G][4];
    for (int h = 0; h < G; ++h)
      for (int v = 0; v < 4; ++v) s[h][v] = _mm512_loadu_ps(block_scales(job, g + h, b) + kSub * v);
    for (int64_t p = b * job.pairs_per_block; p < (b + 1) * job.pairs_per_block; ++p) {
      __m512 a0[R], a1[R];
      for (int r = 0; r < R; ++r) a0[r] = _mm512_set1_ps(A[r * job.k + 2 * p]), a1[r] = _mm512_set1_ps(A[r * job.k + 2 * p + 1]);
      for (int h = 0; h < G; ++h) {
        const uint8_t* q = pair_bytes(job, g + h, p);
        prefetch(q + kPrefetchBytes);
        const __m512i d = _mm512_loadu_si512(q);
        for (int v = 0; v < 4; ++v) {
          __m512i e = v == 0 ? d : _mm512_srli_epi32(d, 8 * v);
          __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(e, code), s[h][v]);
          __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(e, 4), code), s[h][v]);
          for (int r = 0; r < R; ++r) {
            acc[h][r][v] = _mm512_fmadd_ps(a0[r], w0, acc[h][r][v]);
            acc[h][r][v] = _mm512_fmadd_ps(a1[r], w1, acc[h][r][v]);
          }
        }
      }
    }
  }
  alignas(64) float sums[kSub];
  for (int h = 0; h < G; ++h)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) {
        _mm512_store_ps(sums, acc[h][r][v]);
        put_vector(tile, i0 + r, h, v, sums);
      }
}

/* The vpermw indices of vector v from a pair's 64 bytes: dword lane i = (column 4i+v's low nibble,
 * its high nibble) in the low bits of its two words (vpermw reads bits 0-4; the table repeats the
 * 16 codes, so bit 4 does not matter). With AVX-512-VBMI one vpmultishiftqb picks both nibbles. */
KBIT_AVX512BF16 inline __m512i bf16_indices(__m512i d, int v) {
  __m512i e = v == 0 ? d : _mm512_srl_epi32(d, _mm_cvtsi32_si128(8 * v));
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, e, _mm512_slli_epi32(e, 12));
}

/* vpmultishiftqb written as assembly: the kernels are compiled for AVX-512-BF16 without VBMI, so that
 * the compiler cannot put a VBMI instruction into the path of a CPU without it (a Cooper Lake); this
 * one instruction runs only where avx512_vbmi_usable() said so. */
KBIT_AVX512BF16 inline __m512i bf16_indices_vbmi(__m512i d, int v) {
  /* qword = 8 columns; output dwords (column 4h + v of the qword, h = 0, 1): bit offsets of its nibbles. */
  const __m512i ctrl = _mm512_set1_epi64((long long)((uint64_t)(8 * v) | (uint64_t)(8 * v + 4) << 16 |
                                                     (uint64_t)(32 + 8 * v) << 32 | (uint64_t)(36 + 8 * v) << 48));
  __m512i out;
  __asm__("vpmultishiftqb %2, %1, %0" : "=v"(out) : "v"(ctrl), "v"(d)); /* AT&T: data, control, dest */
  return out;
}

/* R rows from i0, vectors [V0, V0 + VN) of group g, bfloat16: part sums a block, acc the blocks. A
 * pass after the first (V0 > 0) reads the group's lines from cache and prefetches the next group's
 * instead, so the memory stays busy. */
template <int R, int V0, int VN, bool VBMI>
KBIT_AVX512BF16 void group_bf16(const TiledJob& job, int64_t g, int64_t i0, float* tile) {
  const __m512i table = _mm512_loadu_si512(job.table_bf16);
  const uint16_t* A = static_cast<const uint16_t*>(job.A) + i0 * job.k;
  const int passes = 4 / VN, pass = V0 / VN;
  const bool next = pass > 0 && g + 1 < job.groups;
  __m512 acc[R][VN];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VN; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < job.blocks; ++b) {
    __m512 part[R][VN];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < VN; ++v) part[r][v] = _mm512_setzero_ps();
    for (int64_t p = b * job.pairs_per_block; p < (b + 1) * job.pairs_per_block; ++p) {
      __m512bh a[R];
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        memcpy(&pair, A + r * job.k + 2 * p, sizeof(pair));
        a[r] = (__m512bh)_mm512_set1_epi32(pair);
      }
      if (next && p % (passes - 1) == pass - 1) prefetch(pair_bytes(job, g + 1, p));
      const uint8_t* q = pair_bytes(job, g, p);
      if (pass == 0) prefetch(q + kPrefetchBytes);
      const __m512i d = _mm512_loadu_si512(q);
      for (int v = 0; v < VN; ++v) {
        __m512i idx = VBMI ? bf16_indices_vbmi(d, V0 + v) : bf16_indices(d, V0 + v);
        __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table);
        for (int r = 0; r < R; ++r) part[r][v] = _mm512_dpbf16_ps(part[r][v], a[r], w);
      }
    }
    for (int v = 0; v < VN; ++v) {
      __m512 sc = _mm512_loadu_ps(block_scales(job, g, b) + kSub * (V0 + v));
      for (int r = 0; r < R; ++r) acc[r][v] = _mm512_fmadd_ps(part[r][v], sc, acc[r][v]);
    }
  }
  alignas(64) float sums[kSub];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VN; ++v) {
      _mm512_store_ps(sums, acc[r][v]);
      put_vector(tile, i0 + r, 0, V0 + v, sums);
    }
}

/* As group_avx512 in 8 lanes: R rows from i0, the half H (lanes 8H..8H+7) of every vector of group g. */
template <int R>
KBIT_AVX2 void group_avx2(const TiledJob& job, int64_t g, int hg, int64_t i0, int H, float* tile) {
  const __m256 lo8 = _mm256_loadu_ps(job.codebook), hi8 = _mm256_loadu_ps(job.codebook + 8);
  const float* A = static_cast<const float*>(job.A) + i0 * job.k;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < job.blocks; ++b) {
    const float* s = block_scales(job, g, b) + 8 * H;
    for (int64_t p = b * job.pairs_per_block; p < (b + 1) * job.pairs_per_block; ++p) {
      const uint8_t* q = pair_bytes(job, g, p) + 32 * H;
      prefetch(q + kPrefetchBytes);
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      for (int v = 0; v < 4; ++v) {
        __m256i e = _mm256_srli_epi32(d, 8 * v);
        __m256 sc = _mm256_loadu_ps(s + kSub * v);
        __m256 w0 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, e), sc);
        __m256 w1 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_srli_epi32(e, 4)), sc);
        for (int r = 0; r < R; ++r) {
          acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(A[r * job.k + 2 * p]), w0, acc[r][v]);
          acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(A[r * job.k + 2 * p + 1]), w1, acc[r][v]);
        }
      }
    }
  }
  alignas(32) float sums[kSub];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) {
      _mm256_store_ps(sums + 8 * H, acc[r][v]); /* lanes 8H..8H+7: the other half is the other pass's */
      put_lanes(tile, i0 + r, hg, v, sums, 8 * H, 8);
    }
}

KBIT_AVX512 void rows_avx512(const TiledJob& job, int64_t g, int G, int64_t i0, int64_t rows, float* tile) {
  if (G == 2) return group_avx512<1, 2>(job, g, i0, tile);
  int64_t i = i0;
  for (; i + 4 <= i0 + rows; i += 4) group_avx512<4, 1>(job, g, i, tile);
  switch (i0 + rows - i) {
    case 3: group_avx512<3, 1>(job, g, i, tile); break;
    case 2: group_avx512<2, 1>(job, g, i, tile); break;
    case 1: group_avx512<1, 1>(job, g, i, tile); break;
    default: break;
  }
}

template <bool VBMI>
KBIT_AVX512BF16 void rows_bf16(const TiledJob& job, int64_t g, int64_t i0, int64_t rows, float* tile) {
  int64_t i = i0, end = i0 + rows;
  /* 8 rows x 2 vectors a pass (measured best of 1, 2 and 4 vectors; 16 rows spill), then 4 rows x 4 */
  for (; end - i >= 8; i += 8) {
    group_bf16<8, 0, 2, VBMI>(job, g, i, tile);
    group_bf16<8, 2, 2, VBMI>(job, g, i, tile);
  }
  for (; end - i >= 4; i += 4) group_bf16<4, 0, 4, VBMI>(job, g, i, tile);
  switch (end - i) {
    case 3: group_bf16<3, 0, 4, VBMI>(job, g, i, tile); break;
    case 2: group_bf16<2, 0, 4, VBMI>(job, g, i, tile); break;
    case 1: group_bf16<1, 0, 4, VBMI>(job, g, i, tile); break;
    default: break;
  }
}

KBIT_AVX2 void rows_avx2(const TiledJob& job, int64_t g, int hg, int64_t i0, int64_t rows, float* tile) {
  int64_t i = i0;
  for (; i + 2 <= i0 + rows; i += 2)
    for (int h = 0; h < 2; ++h) group_avx2<2>(job, g, hg, i, h, tile);
  if (i < i0 + rows)
    for (int h = 0; h < 2; ++h) group_avx2<1>(job, g, hg, i, h, tile);
}
#endif /* KBIT_TILED_X86 */

/* out = tile (+ bias) for the task's rows and group h's columns, rounded once to the dtype. */
void finish_scalar(const TiledJob& job, int64_t j0, int64_t cols, int64_t i, const float* row) {
  for (int64_t c = 0; c < cols; ++c) {
    float x = row[c];
    if (job.bias != NULL) x += cpu::load_dtype(job.dtype, job.bias, j0 + c);
    cpu::store_dtype(job.dtype, job.out, i * job.n + j0 + c, x);
  }
}

#if defined(KBIT_TILED_X86)
/* float32 and bfloat16 in 16 lanes: the bfloat16 rounding is kbit_f32_to_bf16's, in integers. */
KBIT_AVX512 void finish_avx512(const TiledJob& job, int64_t j0, int64_t cols, int64_t i, const float* row) {
  for (int64_t c = 0; c < cols; c += kSub) {
    __mmask16 m = cols - c >= kSub ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(m, row + c);
    if (job.dtype == KBIT_DTYPE_F32) {
      if (job.bias != NULL) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, static_cast<const float*>(job.bias) + j0 + c));
      _mm512_mask_storeu_ps(static_cast<float*>(job.out) + i * job.n + j0 + c, m, x);
      continue;
    }
    if (job.bias != NULL) {
      __m256i b = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(job.bias) + j0 + c);
      x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
    __m512i u = _mm512_castps_si512(x);
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                          _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(job.out) + i * job.n + j0 + c, m, _mm512_cvtepi32_epi16(rounded));
  }
}
#endif

void finish(const TiledJob& job, int64_t g, int h, int64_t i0, int64_t rows, const float* tile) {
  int64_t j0 = g * kGroup, cols = job.n - j0 < kGroup ? job.n - j0 : kGroup;
  for (int64_t i = i0; i < i0 + rows; ++i) {
    const float* row = tile + (h * kRowChunk + i % kRowChunk) * kGroup;
#if defined(KBIT_TILED_X86)
    if (job.path >= kAvx512 && job.dtype != KBIT_DTYPE_F16) {
      finish_avx512(job, j0, cols, i, row);
      continue;
    }
#endif
    finish_scalar(job, j0, cols, i, row);
  }
}

/* Task t: groups [t / row_chunks * per_task, + per_task) (two for a single row of A, else one), rows of
 * chunk t % row_chunks. */
void tiled_tasks(void* ctx, int64_t t0, int64_t t1) {
  const TiledJob& job = *static_cast<const TiledJob*>(ctx);
  alignas(64) float tile[2 * kRowChunk * kGroup];
  for (int64_t task = t0; task < t1; ++task) {
    int64_t g = task / job.row_chunks * job.per_task, i0 = task % job.row_chunks * kRowChunk;
    int64_t rows = job.m - i0 < kRowChunk ? job.m - i0 : kRowChunk;
    int G = job.groups - g < job.per_task ? (int)(job.groups - g) : (int)job.per_task;
    if (job.k == 0) {
      memset(tile, 0, sizeof(tile));
    } else {
#if defined(KBIT_TILED_X86)
      if (job.path == kAvx512Bf16) {
        if (job.vbmi) rows_bf16<true>(job, g, i0, rows, tile);
        else rows_bf16<false>(job, g, i0, rows, tile);
      } else if (job.path == kAvx512) {
        rows_avx512(job, g, G, i0, rows, tile);
      } else if (job.path == kAvx2) {
        for (int h = 0; h < G; ++h) rows_avx2(job, g + h, h, i0, rows, tile);
      } else
#endif
      {
        for (int h = 0; h < G; ++h) group_portable(job, g + h, h, i0, rows, tile);
      }
    }
    for (int h = 0; h < G; ++h) finish(job, g + h, h, i0, rows, tile);
  }
}


const char* path_name(int path, bool vbmi) {
  switch (path) {
    case kAvx512Bf16: return vbmi ? "kbit_matmul_4bit_tiled:avx512bf16-vbmi" : "kbit_matmul_4bit_tiled:avx512bf16";
    case kAvx512: return "kbit_matmul_4bit_tiled:avx512";
    case kAvx2: return "kbit_matmul_4bit_tiled:avx2";
    default: return "kbit_matmul_4bit_tiled:portable";
  }
}

/* Arguments both entry points share: the weight's shape and blocksize (k_in a multiple of it). */
int check_tiled_shape(int64_t n_out, int64_t k_in, int32_t blocksize) {
  if (n_out < 0 || k_in < 0) return KBIT_ERR_INVALID_ARGUMENT;
  if (!is_blockwise4_blocksize(blocksize)) return KBIT_ERR_UNSUPPORTED_BLOCKSIZE;
  if (k_in % blocksize != 0) return KBIT_ERR_INVALID_ARGUMENT;
  int64_t groups = (n_out + kGroup - 1) / kGroup;
  if (k_in > 0 && groups > INT64_MAX / kGroup / k_in) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" KBIT_API int kbit_repack_4bit_tiled(const uint8_t* packed, const float* absmax, uint8_t* tiled,
                                               float* scales, int64_t n_out, int64_t k_in, int32_t blocksize) {
  int status = check_tiled_shape(n_out, k_in, blocksize);
  if (status != KBIT_OK || n_out == 0 || k_in == 0) return status;
  if (packed == NULL || absmax == NULL || tiled == NULL || scales == NULL) return KBIT_ERR_INVALID_ARGUMENT;
  cpu::record_path("kbit_repack_4bit_tiled:portable");
  const int64_t groups = (n_out + kGroup - 1) / kGroup, pairs = k_in / 2, blocks = k_in / blocksize;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < kGroup; ++c) {
      int64_t j = g * kGroup + c;
      const uint8_t* row = j < n_out ? packed + j * pairs : NULL; /* k_in is even: rows start a byte */
      for (int64_t p = 0; p < pairs; ++p) {
        /* bitsandbytes: value 2p in the high nibble; tiled: in the low one. */
        tiled[(g * pairs + p) * kGroup + c] = row ? (uint8_t)((row[p] >> 4) | (row[p] << 4)) : 0;
      }
      /* column c = lane_column(v, i) = 4i + v is lane i of vector v */
      int64_t lane = (c % 4) * kSub + c / 4;
      for (int64_t b = 0; b < blocks; ++b) scales[(g * blocks + b) * kGroup + lane] = row ? absmax[j * blocks + b] : 0.0f;
    }
  }
  return KBIT_OK;
}

extern "C" KBIT_API int kbit_matmul_4bit_tiled(int dtype, int quant_type, const void* A, const uint8_t* tiled,
                                               const float* scales, const void* bias, void* out, int64_t m_rows,
                                               int64_t n_out, int64_t k_in, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_tiled_shape(n_out, k_in, blocksize);
  if (status == KBIT_OK) status = check_matmul4(dtype, quant_type, A, tiled, scales, out, m_rows, n_out, k_in, blocksize);
  if (status != KBIT_OK || m_rows == 0 || n_out == 0) return status;
  TiledJob job;
  job.dtype = dtype;
  job.path = cpu::matmul_path(dtype);
#if defined(KBIT_TILED_X86)
  job.vbmi = job.path == kAvx512Bf16 && cpu::avx512_vbmi_usable();
#else
  job.vbmi = false;
#endif
  job.tiled = tiled;
  job.scales = scales;
  job.bias = bias;
  job.out = out;
  job.m = m_rows;
  job.n = n_out;
  job.k = k_in;
  job.blocks = k_in / blocksize;
  job.pairs_per_block = blocksize / 2;
  job.groups = (n_out + kGroup - 1) / kGroup;
  job.row_chunks = (m_rows + kRowChunk - 1) / kRowChunk;
  job.per_task = m_rows == 1 && job.path == kAvx512 ? 2 : 1; /* float32 one row: two groups at once */
  for (int c = 0; c < KBIT_CODEBOOK4_SIZE; ++c) job.codebook[c] = kbit_code4_value(quant_type, c);
  for (int c = 0; c < 32; ++c) job.table_bf16[c] = kbit_f32_to_bf16(job.codebook[c & 15]);
  cpu::record_path(path_name(job.path, job.vbmi));
  float* converted = NULL;
  job.A = A;
  if (k_in > 0 && job.path != kAvx512Bf16 && dtype != KBIT_DTYPE_F32) { /* the float paths read float32 */
    if ((uint64_t)m_rows > SIZE_MAX / sizeof(float) / (uint64_t)k_in) return KBIT_ERR_TOO_LARGE;
    converted = static_cast<float*>(malloc((size_t)m_rows * k_in * sizeof(float)));
    if (converted == NULL) return KBIT_ERR_OUT_OF_MEMORY;
    for (int64_t i = 0; i < m_rows * k_in; ++i) converted[i] = cpu::load_dtype(dtype, A, i);
    job.A = converted;
  }
  /* Tasks: (group or two, chunk of up to 16 rows). One or two rows of A are memory-bound: one contiguous
   * range per thread (as a plain read's split; 8 ranges a thread ran at 1.2x, one at 1.0-1.06x of the
   * read time here). More rows: about 8 ranges per thread, so a late thread takes fewer. */
  int64_t tasks = (job.groups + job.per_task - 1) / job.per_task * job.row_chunks;
  int64_t threads = cpu_thread_count();
  int64_t ranges = m_rows <= 2 ? threads : threads * 8;
  int64_t grain = (tasks + ranges - 1) / ranges;
  parallel_for(tasks, grain < 1 ? 1 : grain, tiled_tasks, &job);
  free(converted);
  return KBIT_OK;
}
