/*
 * libkbit_cpu.so: the kbit C ABI on host memory.
 *
 * Blocks are independent, so work is split over blocks (parallel.h). Inner loops run over one
 * block's contiguous values with restrict-qualified pointers so the compiler vectorizes them.
 * Quantization looks codes up in a per-call table of KBIT_GRID_SIZE entries, one per grid bucket
 * (see kbit_math.h): entry j is the codebook entry nearest to grid point j, which is exactly what
 * kbit_quantize_value computes, so the table is a cache of the shared math, not a second rule.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kbit.h"
#include "kbit_common.h"
#include "kbit_math.h"
#include "parallel.h"

namespace kbit {
namespace {

/* Below this many values the table costs more than it saves. */
const int64_t kGridTableMinValues = 32768;
/* Values per pass of the two-pass quantize loop (an int32 bucket per value on the stack). */
const int64_t kQuantizeChunk = 512;
/* Values per parallel chunk, so thread starts are amortized. */
const int64_t kValuesPerChunk = 65536;

struct LoadF32 {
  static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
struct LoadF16 {
  static float load(const void* p, int64_t i) { return kbit_f16_to_f32(static_cast<const uint16_t*>(p)[i]); }
};
struct LoadBF16 {
  static float load(const void* p, int64_t i) { return kbit_bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
};

struct StoreF32 {
  static void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};
struct StoreF16 {
  static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = kbit_f32_to_f16(v); }
};
struct StoreBF16 {
  static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = kbit_f32_to_bf16(v); }
};

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

struct QuantizeJob {
  const void* A;
  const float* code;
  const uint8_t* table; /* NULL: search the codebook per value */
  uint8_t* out;
  float* absmax;
  int64_t n;
  int64_t blocksize;
};

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
void quantize_range(void* ctx, int64_t first_block, int64_t end_block) {
  const QuantizeJob& job = *static_cast<const QuantizeJob*>(ctx);
  const uint8_t* __restrict table = job.table;
  uint8_t* __restrict out = job.out;
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = job.n - start < job.blocksize ? job.n - start : job.blocksize;
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
    int64_t len = job.n - start < job.blocksize ? job.n - start : job.blocksize;
    float m = job.absmax[b];
    for (int64_t i = 0; i < len; ++i) S::store(job.out, start + i, kbit_dequantize_value(lut, codes[start + i], m));
  }
}

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
void quantize4_range(void* ctx, int64_t first_block, int64_t end_block) {
  const Quantize4Job& job = *static_cast<const Quantize4Job*>(ctx);
  float bounds[15]; /* local copies: no aliasing with `out` */
  int32_t deltas[15];
#pragma GCC unroll 15
  for (int k = 0; k < 15; ++k) bounds[k] = kbit_bound4(QT, k), deltas[k] = kbit_code4_delta(QT, k);
  const int32_t base = kbit_code4_base(QT);
  const int32_t zero_code = kbit_quantize4_code(bounds, deltas, base, 0.0f); /* the padding nibble of an odd n */
  uint8_t* __restrict out = job.out;
  int32_t code[kQuantizeChunk + 1];
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = job.n - start < job.blocksize ? job.n - start : job.blocksize;
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
}

struct Dequantize4Job {
  const uint8_t* packed;
  const float* absmax;
  void* out;
  int64_t n;
  int64_t blocksize;
  float pairs[256][2]; /* the two codebook values of each byte */
};

template <typename S>
void dequantize4_range(void* ctx, int64_t first_block, int64_t end_block) {
  const Dequantize4Job& job = *static_cast<const Dequantize4Job*>(ctx);
  const uint8_t* __restrict packed = job.packed;
  const float(*__restrict lut)[2] = job.pairs;
  for (int64_t b = first_block; b < end_block; ++b) {
    int64_t start = b * job.blocksize;
    int64_t len = job.n - start < job.blocksize ? job.n - start : job.blocksize;
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
}

}  // namespace
}  // namespace kbit

using namespace kbit;

extern "C" {

KBIT_API int kbit_abi_version(void) { return KBIT_ABI_VERSION; }

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
  uint8_t* table = NULL;
  if (n >= kGridTableMinValues) {
    table = static_cast<uint8_t*>(malloc(KBIT_GRID_SIZE));
    if (table != NULL) build_grid_table(code, table); /* no memory: fall back to per-value search */
  }
  QuantizeJob job = {A, code, table, out, absmax, n, blocksize};
  int64_t blocks = (n + blocksize - 1) / blocksize;
  int64_t grain = kValuesPerChunk / blocksize > 0 ? kValuesPerChunk / blocksize : 1;
  switch (dtype) {
    case KBIT_DTYPE_F32: parallel_for(blocks, grain, quantize_range<LoadF32>, &job); break;
    case KBIT_DTYPE_F16: parallel_for(blocks, grain, quantize_range<LoadF16>, &job); break;
    default: parallel_for(blocks, grain, quantize_range<LoadBF16>, &job); break;
  }
  free(table);
  return KBIT_OK;
}

KBIT_API int kbit_dequantize_blockwise_8bit(int dtype, const uint8_t* codes, const float* code, const float* absmax,
                                            void* out, int64_t n, int32_t blocksize, void* stream) {
  (void)stream;
  int status = check_blockwise8(dtype, out, code, codes, absmax, n, blocksize);
  if (status != KBIT_OK || n == 0) return status;
  DequantizeJob job = {codes, code, absmax, out, n, blocksize};
  int64_t blocks = (n + blocksize - 1) / blocksize;
  int64_t grain = kValuesPerChunk / blocksize > 0 ? kValuesPerChunk / blocksize : 1;
  switch (dtype) {
    case KBIT_DTYPE_F32: parallel_for(blocks, grain, dequantize_range<StoreF32>, &job); break;
    case KBIT_DTYPE_F16: parallel_for(blocks, grain, dequantize_range<StoreF16>, &job); break;
    default: parallel_for(blocks, grain, dequantize_range<StoreBF16>, &job); break;
  }
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
  int64_t grain = kValuesPerChunk / blocksize > 0 ? kValuesPerChunk / blocksize : 1;
  range_fn fn;
  if (quant_type == KBIT_QUANT_NF4) {
    fn = dtype == KBIT_DTYPE_F32   ? quantize4_range<LoadF32, KBIT_QUANT_NF4>
         : dtype == KBIT_DTYPE_F16 ? quantize4_range<LoadF16, KBIT_QUANT_NF4>
                                   : quantize4_range<LoadBF16, KBIT_QUANT_NF4>;
  } else {
    fn = dtype == KBIT_DTYPE_F32   ? quantize4_range<LoadF32, KBIT_QUANT_FP4>
         : dtype == KBIT_DTYPE_F16 ? quantize4_range<LoadF16, KBIT_QUANT_FP4>
                                   : quantize4_range<LoadBF16, KBIT_QUANT_FP4>;
  }
  parallel_for(blocks, grain, fn, &job);
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
  float codebook[KBIT_CODEBOOK4_SIZE];
  for (int k = 0; k < KBIT_CODEBOOK4_SIZE; ++k) codebook[k] = kbit_code4_value(quant_type, k);
  /* A cache of kbit_dequantize4_value's operand per byte: pair[v] * m is that function's product. */
  for (int v = 0; v < 256; ++v) {
    job.pairs[v][0] = codebook[kbit_unpack4_first((uint8_t)v)];
    job.pairs[v][1] = codebook[kbit_unpack4_second((uint8_t)v)];
  }
  int64_t blocks = (n + blocksize - 1) / blocksize;
  int64_t grain = kValuesPerChunk / blocksize > 0 ? kValuesPerChunk / blocksize : 1;
  switch (dtype) {
    case KBIT_DTYPE_F32: parallel_for(blocks, grain, dequantize4_range<StoreF32>, &job); break;
    case KBIT_DTYPE_F16: parallel_for(blocks, grain, dequantize4_range<StoreF16>, &job); break;
    default: parallel_for(blocks, grain, dequantize4_range<StoreBF16>, &job); break;
  }
  return KBIT_OK;
}

}  // extern "C"
