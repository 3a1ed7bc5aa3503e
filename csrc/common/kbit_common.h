/*
 * Argument checks and status messages shared by every backend, so that each library rejects the
 * same bad calls with the same statuses.
 */
#ifndef KBIT_COMMON_KBIT_COMMON_H_
#define KBIT_COMMON_KBIT_COMMON_H_

#include <stddef.h>
#include <stdint.h>

#include "kbit.h"

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
    default: return NULL;
  }
}

}  // namespace kbit

#endif /* KBIT_COMMON_KBIT_COMMON_H_ */
