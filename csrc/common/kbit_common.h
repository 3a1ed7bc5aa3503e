/*
 * Argument checks and status messages shared by every backend, so that each library rejects the
 * same bad calls with the same statuses.
 */
#ifndef KBIT_COMMON_KBIT_COMMON_H_
#define KBIT_COMMON_KBIT_COMMON_H_

#include <stddef.h>
#include <stdint.h>

#include "kbit.h"
#include "kbit_optim_math.h"

namespace kbit {

inline bool is_supported_dtype(int dtype) {
  return dtype == KBIT_DTYPE_F32 || dtype == KBIT_DTYPE_F16 || dtype == KBIT_DTYPE_BF16;
}

inline bool is_blockwise8_blocksize(int32_t blocksize) {
  return blocksize >= KBIT_BLOCKWISE8_MIN_BLOCKSIZE && blocksize <= KBIT_BLOCKWISE8_MAX_BLOCKSIZE &&
         (blocksize & (blocksize - 1)) == 0;
}

inline int32_t log2_pow2(int32_t v) {
  int32_t s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

/* Checks common to both 8-bit blockwise entry points. n == 0 is valid (and a no-op for callers);
 * pointers may then be NULL. */
inline int check_blockwise8(int dtype, const void* values, const void* code, const void* codes,
                            const void* absmax, int64_t n, int32_t blocksize) {
  if (n < 0) return KBIT_ERR_INVALID_ARGUMENT;
  if (!is_supported_dtype(dtype)) return KBIT_ERR_UNSUPPORTED_DTYPE;
  if (!is_blockwise8_blocksize(blocksize)) return KBIT_ERR_UNSUPPORTED_BLOCKSIZE;
  if (n == 0) return KBIT_OK;
  if (values == NULL || code == NULL || codes == NULL || absmax == NULL) return KBIT_ERR_INVALID_ARGUMENT;
  /* Byte offsets of the largest dtype must fit int64 with room to spare. */
  if (n > (INT64_MAX / 8)) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

inline bool is_blockwise4_blocksize(int32_t blocksize) {
  return blocksize >= KBIT_BLOCKWISE4_MIN_BLOCKSIZE && blocksize <= KBIT_BLOCKWISE4_MAX_BLOCKSIZE &&
         (blocksize & (blocksize - 1)) == 0;
}

inline bool is_quant_type4(int quant_type) { return quant_type == KBIT_QUANT_FP4 || quant_type == KBIT_QUANT_NF4; }

/* Checks common to both 4-bit entry points; as check_blockwise8. */
inline int check_blockwise4(int dtype, int quant_type, const void* values, const void* packed, const void* absmax,
                            int64_t n, int32_t blocksize) {
  if (n < 0) return KBIT_ERR_INVALID_ARGUMENT;
  if (!is_supported_dtype(dtype)) return KBIT_ERR_UNSUPPORTED_DTYPE;
  if (!is_quant_type4(quant_type)) return KBIT_ERR_UNSUPPORTED_QUANT_TYPE;
  if (!is_blockwise4_blocksize(blocksize)) return KBIT_ERR_UNSUPPORTED_BLOCKSIZE;
  if (n == 0) return KBIT_OK;
  if (values == NULL || packed == NULL || absmax == NULL) return KBIT_ERR_INVALID_ARGUMENT;
  if (n > (INT64_MAX / 8)) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

/* Message of a kbit status (not of CUDA statuses); NULL if unknown. */
inline const char* kbit_own_status_string(int status) {
  switch (status) {
    case KBIT_OK: return "success";
    case KBIT_ERR_INVALID_ARGUMENT: return "invalid argument (a NULL pointer or a negative size)";
    case KBIT_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case KBIT_ERR_UNSUPPORTED_BLOCKSIZE: return "unsupported blocksize (needs a power of two in the family's range)";
    case KBIT_ERR_TOO_LARGE: return "too many elements for this kernel";
    case KBIT_ERR_INTERNAL: return "internal error in kbit (please report it)";
    case KBIT_ERR_UNSUPPORTED_QUANT_TYPE: return "unsupported 4-bit quant type (needs KBIT_QUANT_FP4 or KBIT_QUANT_NF4)";
    case KBIT_ERR_OUT_OF_MEMORY: return "out of memory (a work buffer could not be allocated)";
    case KBIT_ERR_NOT_IN_THIS_LIBRARY: return "not available in this library (the CPU library has it)";
    default: return NULL;
  }
}

/* ---- 4-bit GEMV and 8-bit optimizers ---- */

/* Checks of kbit_gemv_4bit. n_out == 0 is a no-op (pointers may be NULL); k_in == 0 writes bias (or
 * 0) to out, so only out (and bias if given) are used. The n_out * k_in values of W must be
 * addressable in bytes of the largest dtype: overflow is KBIT_ERR_TOO_LARGE. */
inline int check_gemv4(int dtype, int quant_type, const void* A, const void* packed, const void* absmax, const void* out,
                       int64_t n_out, int64_t k_in, int32_t blocksize) {
  if (n_out < 0 || k_in < 0) return KBIT_ERR_INVALID_ARGUMENT;
  if (!is_supported_dtype(dtype)) return KBIT_ERR_UNSUPPORTED_DTYPE;
  if (!is_quant_type4(quant_type)) return KBIT_ERR_UNSUPPORTED_QUANT_TYPE;
  if (!is_blockwise4_blocksize(blocksize)) return KBIT_ERR_UNSUPPORTED_BLOCKSIZE;
  if (n_out == 0) return KBIT_OK;
  if (out == NULL) return KBIT_ERR_INVALID_ARGUMENT;
  if (k_in > 0 && (A == NULL || packed == NULL || absmax == NULL)) return KBIT_ERR_INVALID_ARGUMENT;
  if (n_out > INT64_MAX / 8 || (k_in > 0 && n_out > (INT64_MAX / 8) / k_in)) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

/* kbit_matmul_4bit: as the GEMV, for m_rows rows of A (m_rows * k_in and m_rows * n_out indexable too). */
inline int check_matmul4(int dtype, int quant_type, const void* A, const void* packed, const void* absmax,
                         const void* out, int64_t m_rows, int64_t n_out, int64_t k_in, int32_t blocksize) {
  if (m_rows < 0) return KBIT_ERR_INVALID_ARGUMENT;
  /* m_rows = 0: the arguments' kinds are checked, no pointer is (nothing is read or written). */
  int status = check_gemv4(dtype, quant_type, A, packed, absmax, out, m_rows == 0 ? 0 : n_out, k_in, blocksize);
  if (status == KBIT_OK && m_rows == 0 && n_out < 0) status = KBIT_ERR_INVALID_ARGUMENT;
  if (status != KBIT_OK || n_out == 0 || m_rows == 0) return status;
  if (out == NULL) return KBIT_ERR_INVALID_ARGUMENT;
  if (m_rows > INT64_MAX / 8 / n_out || (k_in > 0 && m_rows > (INT64_MAX / 8) / k_in)) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

/* A finite float in [lo, hi) (hi_open) or [lo, hi]; NaN fails every comparison. */
inline bool float_in(float v, float lo, float hi, bool hi_open) {
  if (!(v >= lo)) return false;
  if (hi_open ? !(v < hi) : !(v <= hi)) return false;
  return v - v == 0.0f; /* finite */
}

/* Checks of kbit_adam_8bit_blockwise: hyperparameters first (so bad ones are reported even for
 * n == 0), then the pointers, then the size. beta1, beta2 in [0, 1); eps, weight_decay, lr,
 * gnorm_scale finite and >= 0; step >= 1; decoupled_weight_decay 0 or 1. (The entry points also
 * refuse steps whose float32 constants overflow: prepare_adam8.) */
inline int check_adam8(int dtype, const void* p, const void* g, const void* state1, const void* state2,
                       const void* absmax1, const void* absmax2, const void* qmap1, const void* qmap2, float beta1,
                       float beta2, float eps, float weight_decay, float lr, int32_t step, float gnorm_scale,
                       int decoupled_weight_decay, int64_t n) {
  const float kBig = 3.0e38f;
  if (n < 0) return KBIT_ERR_INVALID_ARGUMENT;
  if (!is_supported_dtype(dtype)) return KBIT_ERR_UNSUPPORTED_DTYPE;
  if (!float_in(beta1, 0.0f, 1.0f, true) || !float_in(beta2, 0.0f, 1.0f, true)) return KBIT_ERR_INVALID_ARGUMENT;
  if (!float_in(eps, 0.0f, kBig, false) || !float_in(weight_decay, 0.0f, kBig, false) ||
      !float_in(lr, 0.0f, kBig, false) || !float_in(gnorm_scale, 0.0f, kBig, false))
    return KBIT_ERR_INVALID_ARGUMENT;
  if (step < 1) return KBIT_ERR_INVALID_ARGUMENT;
  if (decoupled_weight_decay != 0 && decoupled_weight_decay != 1) return KBIT_ERR_INVALID_ARGUMENT;
  if (n == 0) return KBIT_OK;
  if (p == NULL || g == NULL || state1 == NULL || state2 == NULL || absmax1 == NULL || absmax2 == NULL ||
      qmap1 == NULL || qmap2 == NULL)
    return KBIT_ERR_INVALID_ARGUMENT;
  if (n > (INT64_MAX / 8)) return KBIT_ERR_TOO_LARGE;
  return KBIT_OK;
}

/* The host side of kbit_adam_8bit_blockwise before any kernel, shared by every backend: check_adam8,
 * then the step's float32 constants into *q (kbit_adam_params), refused if not finite. Callers then
 * return the status if it is not KBIT_OK, and KBIT_OK for n == 0. */
inline int prepare_adam8(int dtype, const void* p, const void* g, const void* state1, const void* state2,
                         const void* absmax1, const void* absmax2, const void* qmap1, const void* qmap2, float beta1,
                         float beta2, float eps, float weight_decay, float lr, int32_t step, float gnorm_scale,
                         int decoupled_weight_decay, int64_t n, KbitAdamParams* q) {
  int status = check_adam8(dtype, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, beta1, beta2, eps,
                           weight_decay, lr, step, gnorm_scale, decoupled_weight_decay, n);
  if (status != KBIT_OK) return status;
  *q = kbit_adam_params(beta1, beta2, eps, weight_decay, lr, step, gnorm_scale, decoupled_weight_decay);
  return kbit_adam_params_finite(q) ? KBIT_OK : KBIT_ERR_INVALID_ARGUMENT;
}

}  // namespace kbit

#endif /* KBIT_COMMON_KBIT_COMMON_H_ */
