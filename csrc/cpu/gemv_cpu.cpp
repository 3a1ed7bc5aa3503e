/*
 * kbit_gemv_4bit on the host: out = W' · A (+ bias) for a 4-bit (NF4/FP4) weight, never
 * materializing W'.
 *
 * Work is split over output rows (parallel.h). A row is the values [j * k_in, (j + 1) * k_in) of
 * the flat quantized tensor; it is walked as segments that each lie in one quantization block, so
 * the general case (k_in not a multiple of blocksize: blocks straddle rows, and an odd k_in starts
 * every other row at a low nibble) is the same loop as the aligned one, with at most one odd nibble
 * at each end of a segment. Within a segment, bytes are decoded in chunks through a 256-entry table
 * of the two codebook values of each byte (two codes per lookup) into a small buffer, then a
 * vectorized loop accumulates A[k] * (entry * absmax) (the float32 W' of kbit.h,
 * kbit_dequantize4_value) into 8 partial sums. A float16/bfloat16 A is converted to float32 once
 * per call, not once per row.
 *
 * On x86-64 CPUs with AVX2 and FMA (checked at run time; KBIT_CPU_SIMD=0 turns it off), the
 * pairs are decoded in registers instead: 8 bytes become 16 nibble indices, looked up in the
 * 16-entry codebook held in two registers (vpermps on each half, a blend on bit 3), multiplied by
 * the block's absmax and accumulated with fused multiply-adds into four independent sums.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KBIT_GEMV_AVX2 1
#endif

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "cpu_dtype.h"
#include "cpu_features.h"
#include "parallel.h"

namespace kbit {
namespace {

/* Values per decode chunk (a float buffer on the stack). */
const int64_t kGemvChunk = 512;
/* Weight values per parallel chunk, so thread starts are amortized. */
const int64_t kGemvValuesPerTask = 1 << 16;

struct GemvJob {
  int dtype;
  const void* A; /* float32 when A_is_f32, else dtype */
  bool A_is_f32;
  const uint8_t* packed;
  const float* absmax;
  const void* bias;
  void* out;
  int64_t k_in;
  int32_t log2_bs;
  float codebook[KBIT_CODEBOOK4_SIZE];
  float pairs[256][2]; /* codebook values of a byte's high and low nibble */
};

/* acc[0..7] += sum over values [pos, end) of the flat weight (all in block `m`'s block) of
 * A[pos - row_start] * W'. */
template <typename L>
void segment_dot(const GemvJob& job, const void* A, int64_t row_start, int64_t pos, int64_t end, float m,
                 float* __restrict acc) {
  const uint8_t* __restrict packed = job.packed;
  if (pos & 1) { /* a leading low nibble */
    acc[0] += L::load(A, pos - row_start) * kbit_dequantize4_value(job.codebook, kbit_unpack4_second(packed[pos >> 1]), m);
    ++pos;
  }
  const float(*__restrict lut)[2] = job.pairs;
  float buf[kGemvChunk];
  while (end - pos >= 2) {
    int64_t cnt = (end - pos) & ~(int64_t)1;
    cnt = cnt < kGemvChunk ? cnt : kGemvChunk;
    const uint8_t* __restrict src = packed + (pos >> 1);
    for (int64_t b = 0; b < cnt / 2; ++b) memcpy(buf + 2 * b, lut[src[b]], sizeof(float[2]));
    int64_t a0 = pos - row_start;
    int64_t k = 0;
    for (; k + 8 <= cnt; k += 8)
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] += L::load(A, a0 + k + t) * (buf[k + t] * m);
    for (; k < cnt; ++k) acc[0] += L::load(A, a0 + k) * (buf[k] * m);
    pos += cnt;
  }
  if (pos < end) /* a trailing high nibble */
    acc[0] += L::load(A, pos - row_start) * kbit_dequantize4_value(job.codebook, kbit_unpack4_first(packed[pos >> 1]), m);
}

/* Row j of W' walked as segments that each lie in one quantization block:
 * segment(row_start, pos, end, absmax of the block), in order. Always inlined, so that in
 * gemv_rows_avx2 the AVX2 segment (and its register accumulators) inline into the row loop too. */
template <typename Segment>
__attribute__((always_inline)) inline void for_each_segment(const GemvJob& job, int64_t j, Segment segment) {
  int64_t start = j * job.k_in, end = start + job.k_in;
  for (int64_t pos = start; pos < end;) {
    int64_t b = pos >> job.log2_bs;
    int64_t bend = (b + 1) << job.log2_bs;
    bend = bend < end ? bend : end;
    segment(start, pos, bend, job.absmax[b]);
    pos = bend;
  }
}

/* The row's dot product from its 8 partial sums, in a fixed order. */
inline float sum8(const float* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename L>
float row_dot(const GemvJob& job, int64_t j) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for_each_segment(job, j, [&](int64_t row_start, int64_t pos, int64_t end, float m) {
    segment_dot<L>(job, job.A, row_start, pos, end, m, acc);
  });
  return sum8(acc);
}

/* out[j] = dot (+ bias[j]) in the output dtype. */
inline void store_row(const GemvJob& job, int64_t j, float v) {
  if (job.bias != NULL) v += cpu::load_dtype(job.dtype, job.bias, j);
  cpu::store_dtype(job.dtype, job.out, j, v);
}

/* L: how A is read (float32 after the one conversion; the dtype's loader if that buffer could not
 * be allocated). */
template <typename L>
void gemv_rows(void* ctx, int64_t first_row, int64_t end_row) {
  const GemvJob& job = *static_cast<const GemvJob*>(ctx);
  for (int64_t j = first_row; j < end_row; ++j) {
    store_row(job, j, job.k_in > 0 ? row_dot<L>(job, j) : 0.0f);
  }
}

#if defined(KBIT_GEMV_AVX2)
#define KBIT_AVX2 __attribute__((target("avx2,fma")))

bool use_avx2() { return kbit::cpu::avx2_usable(true); }

/* As segment_dot, A float32: 16 values per step in registers, the rest as segment_dot does. */
KBIT_AVX2 void segment_dot_avx2(const GemvJob& job, const float* __restrict A, int64_t row_start, int64_t pos,
                                int64_t end, float m, __m256& acc0, __m256& acc1, __m256& acc2, __m256& acc3,
                                float* __restrict acc) {
  const uint8_t* __restrict packed = job.packed;
  if (pos & 1) {
    acc[0] += A[pos - row_start] * kbit_dequantize4_value(job.codebook, kbit_unpack4_second(packed[pos >> 1]), m);
    ++pos;
  }
  const __m256 lo8 = _mm256_loadu_ps(job.codebook), hi8 = _mm256_loadu_ps(job.codebook + 8);
  const __m256 vm = _mm256_set1_ps(m);
  const __m128i nib = _mm_set1_epi8(0x0f);
  const uint8_t* __restrict src = packed + (pos >> 1);
  const float* __restrict a = A + (pos - row_start);
  int64_t cnt = end - pos, k = 0;
  /* 32 values per step into four independent sums (fma latency), then 16 at a time. */
  for (; k + 32 <= cnt; k += 32) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k / 2));
    __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
    __m128i c0 = _mm_unpacklo_epi8(h, l), c1 = _mm_unpackhi_epi8(h, l);
    __m256 w0 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(c0)), vm);
    __m256 w1 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8))), vm);
    __m256 w2 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(c1)), vm);
    __m256 w3 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8))), vm);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), w0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), w1, acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), w2, acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), w3, acc3);
  }
  for (; k + 16 <= cnt; k += 16) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k / 2));
    __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nib), _mm_and_si128(bytes, nib));
    __m256 w0 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(codes)), vm);
    __m256 w1 = _mm256_mul_ps(cpu::lookup16_avx2(lo8, hi8, _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))), vm);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), w0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), w1, acc1);
  }
  for (; k + 2 <= cnt; k += 2) {
    uint8_t byte = src[k / 2];
    acc[k & 7] += a[k] * kbit_dequantize4_value(job.codebook, kbit_unpack4_first(byte), m);
    acc[(k + 1) & 7] += a[k + 1] * kbit_dequantize4_value(job.codebook, kbit_unpack4_second(byte), m);
  }
  if (k < cnt) acc[0] += a[k] * kbit_dequantize4_value(job.codebook, kbit_unpack4_first(src[k / 2]), m);
}

KBIT_AVX2 void gemv_rows_avx2(void* ctx, int64_t first_row, int64_t end_row) {
  const GemvJob& job = *static_cast<const GemvJob*>(ctx);
  const float* A = static_cast<const float*>(job.A);
  for (int64_t j = first_row; j < end_row; ++j) {
    float v = 0.0f;
    if (job.k_in > 0) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = acc0, acc3 = acc0;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for_each_segment(job, j, [&](int64_t row_start, int64_t pos, int64_t end, float m) KBIT_AVX2 {
        segment_dot_avx2(job, A, row_start, pos, end, m, acc0, acc1, acc2, acc3, acc);
      });
      float lanes[8];
      _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
      for (int t = 0; t < 8; ++t) acc[t] += lanes[t];
      v = sum8(acc);
    }
    store_row(job, j, v);
  }
}
#endif

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" KBIT_API int kbit_gemv_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                       const float* absmax, const void* bias, void* out, int64_t n_out, int64_t k_in,
                                       int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_gemv4(dtype, quant_type, A, packed, absmax, out, n_out, k_in, blocksize);
  if (status != KBIT_OK || n_out == 0) return status;
  GemvJob* job = static_cast<GemvJob*>(malloc(sizeof(GemvJob)));
  if (job == NULL) return KBIT_ERR_INTERNAL;
  job->dtype = dtype;
  job->packed = packed;
  job->absmax = absmax;
  job->bias = bias;
  job->out = out;
  job->k_in = k_in;
  job->log2_bs = log2_pow2(blocksize);
  cpu::fill_code4_tables(quant_type, job->codebook, job->pairs);
  /* A as float32, once: every row reads all of it. */
  float* converted = NULL;
  job->A = A;
  job->A_is_f32 = dtype == KBIT_DTYPE_F32;
  if (!job->A_is_f32 && k_in > 0 && (uint64_t)k_in <= SIZE_MAX / sizeof(float)) {
    converted = static_cast<float*>(malloc((size_t)k_in * sizeof(float)));
    if (converted != NULL) {
      if (dtype == KBIT_DTYPE_F16) {
        for (int64_t k = 0; k < k_in; ++k) converted[k] = cpu::F16::load(A, k);
      } else {
        for (int64_t k = 0; k < k_in; ++k) converted[k] = cpu::BF16::load(A, k);
      }
      job->A = converted;
      job->A_is_f32 = true;
    }
  }
  range_fn fn = job->A_is_f32 ? gemv_rows<cpu::F32>
                : dtype == KBIT_DTYPE_F16 ? gemv_rows<cpu::F16>
                                          : gemv_rows<cpu::BF16>;
  const char* path = "kbit_gemv_4bit:portable";
#if defined(KBIT_GEMV_AVX2)
  if (job->A_is_f32 && use_avx2()) {
    fn = gemv_rows_avx2;
    path = "kbit_gemv_4bit:avx2";
  }
#endif
  cpu::record_path(path);
  int64_t per_row = k_in > 0 ? k_in : 1;
  int64_t grain = kGemvValuesPerTask / per_row > 0 ? kGemvValuesPerTask / per_row : 1;
  parallel_for(n_out, grain, fn, job);
  free(converted);
  free(job);
  return KBIT_OK;
}
