/*
 * kbit C ABI.
 *
 * Every native library of kbit (libkbit_cpu.so and each libkbit_cudaXY.so) exports exactly the
 * functions declared here and nothing else. The CPU library works on host pointers; a CUDA library
 * works on device pointers and launches on the stream the caller passes (a cudaStream_t as void*;
 * NULL is the legacy default stream). The CPU library accepts and ignores the stream argument.
 *
 * Every function that can fail returns a kbit_status (an int): 0 (KBIT_OK) on success, otherwise a
 * code that kbit_status_string() turns into a message. CUDA runtime errors are returned as
 * KBIT_STATUS_CUDA_BASE + cudaError_t, so the message names the CUDA error.
 *
 * This header is the one table of the ABI: the Python runtime ships a copy of it in the package and
 * derives its ctypes bindings (kbit/_abi.py) and the ABI version it needs from the KBIT_API prototypes
 * and KBIT_ABI_VERSION below. So a prototype is one line-initial `KBIT_API <type> kbit_<name>(<type>
 * <name>, ...);` using the types _abi.py knows (kbit_status, int, int32_t, int64_t, float, pointers);
 * docs/kernels.md says how to add one. Bump KBIT_ABI_VERSION on any incompatible change: the runtime
 * refuses a library whose kbit_abi_version() differs from this header's.
 */
#ifndef KBIT_H_
#define KBIT_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define KBIT_API __declspec(dllexport)
#else
#define KBIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KBIT_ABI_VERSION 5

/* The status of a call: KBIT_OK or one of the codes below. */
typedef int kbit_status;

/* Status codes. */
#define KBIT_OK 0
#define KBIT_ERR_INVALID_ARGUMENT 1     /* a NULL pointer, a negative size, ... */
#define KBIT_ERR_UNSUPPORTED_DTYPE 2    /* dtype is not one of kbit_dtype */
#define KBIT_ERR_UNSUPPORTED_BLOCKSIZE 3 /* blocksize is not a power of two in the family's range */
#define KBIT_ERR_TOO_LARGE 4            /* an element count the kernel cannot index */
#define KBIT_ERR_INTERNAL 5             /* a bug in kbit: please report it */
#define KBIT_ERR_UNSUPPORTED_QUANT_TYPE 6 /* quant_type is not one of KBIT_QUANT_* */
#define KBIT_ERR_OUT_OF_MEMORY 7        /* a work buffer could not be allocated */
#define KBIT_ERR_NOT_IN_THIS_LIBRARY 8  /* a CPU-only function called in a CUDA library */
#define KBIT_STATUS_CUDA_BASE 1000      /* KBIT_STATUS_CUDA_BASE + cudaError_t */

/* Element types of floating point inputs and outputs. */
#define KBIT_DTYPE_F32 0
#define KBIT_DTYPE_F16 1
#define KBIT_DTYPE_BF16 2

/* Blocksizes of the 8-bit blockwise family: powers of two in [MIN, MAX]. */
#define KBIT_BLOCKWISE8_MIN_BLOCKSIZE 64
#define KBIT_BLOCKWISE8_MAX_BLOCKSIZE 4096
/* Entries of an 8-bit codebook. */
#define KBIT_CODEBOOK8_SIZE 256

/* Blocksizes of the 4-bit blockwise family: powers of two in [MIN, MAX]. */
#define KBIT_BLOCKWISE4_MIN_BLOCKSIZE 32
#define KBIT_BLOCKWISE4_MAX_BLOCKSIZE 4096
/* 4-bit quantization types (codebooks of KBIT_CODEBOOK4_SIZE entries, fixed: kbit_math.h). */
#define KBIT_QUANT_FP4 0 /* bitsandbytes' FP4 code */
#define KBIT_QUANT_NF4 1 /* NormalFloat4 (QLoRA) */
#define KBIT_CODEBOOK4_SIZE 16

/* KBIT_ABI_VERSION of the library. */
KBIT_API int kbit_abi_version(void);

/*
 * A static, NUL-terminated JSON object describing the build, e.g.
 * {"backend":"cuda","abi":1,"cuda":"12.4","archs":["70","75"],"ptx":["90"],
 *  "compiler":"nvcc 12.4.131","host_compiler":"gcc 12.2.0","revision":"abc123"}
 * The CPU library has "backend":"cpu", "cuda":null, empty "archs" and "ptx".
 */
KBIT_API const char* kbit_build_info(void);

/* A static message for a status returned by any kbit function. Never NULL. */
KBIT_API const char* kbit_status_string(int status);

/*
 * Which kernel the calling thread's last call into this library ran: a static string
 * "<function>:<path>", e.g. "kbit_gemv_4bit:avx2"; "" before the thread's first such call. A call that
 * returns before running a kernel (a bad argument, nothing to do) leaves it as it was. The CPU
 * library's paths (KBIT_CPU_SIMD=0 forces "portable", =avx2 caps at "avx2", =avx512 leaves out VBMI):
 *   kbit_quantize_blockwise_8bit  "avx2" (AVX2, n >= 16384), else "portable"
 *   kbit_dequantize_blockwise_8bit "avx512" (AVX-512 F/BW/VL with AVX2 + FMA), else "portable"
 *   kbit_quantize_4bit, kbit_dequantize_4bit  "avx2" (AVX2), else "portable"
 *   kbit_gemv_4bit                "avx2" (AVX2 + FMA), else "portable"
 *   kbit_matmul_4bit              "avx512bf16" (bfloat16 and AVX-512-BF16), "avx512", "avx2" (AVX2 + FMA)
 *                                 or "portable", with "-direct" for the AVX-512 kernels of up to 4 rows
 *                                 (blocks not straddling rows; avx512bf16 also needs k_in % 64 == 0)
 *   kbit_repack_4bit_tiled        "portable"
 *   kbit_matmul_4bit_tiled        "avx512bf16-vbmi" (bfloat16, AVX-512-BF16 and AVX-512-VBMI), "avx512bf16"
 *                                 (bfloat16 and AVX-512-BF16), "avx512", "avx2" (AVX2 + FMA) or "portable"
 *   kbit_adam_8bit_blockwise      "portable"
 * The CUDA libraries record no path: always "".
 */
KBIT_API const char* kbit_last_path(void);

/*
 * 8-bit blockwise dynamic quantization (bitsandbytes' blockwise layout).
 *
 * A holds n values of dtype. For block b (values [b*blocksize, min((b+1)*blocksize, n))):
 *   absmax[b] = max |A[i]|, and out[i] = the index of the entry of `code` nearest to A[i] / absmax[b].
 * `code` holds KBIT_CODEBOOK8_SIZE float32 values sorted ascending. Bit-compatible with
 * bitsandbytes' CPU kernel: x = A[i] / absmax[b] (float32 division) is first snapped to the nearest
 * of 65536 evenly spaced points on [-1, 1] (bucket floor((x + 1) * 32767.5 + 0.5)), and out[i] is
 * the entry nearest to that point, ties to the lower index (csrc/common/kbit_math.h). This differs
 * from a plain nearest search only within 1.5e-5 of a midpoint between two entries; near 0 the
 * dynamic map's tiny entries are not resolved (x = 0 gives the entry nearest to 1.5e-5).
 * Edge cases, also as bitsandbytes: NaN values are ignored by absmax and get code 0; a block whose
 * absmax is 0 gets code 0 everywhere (0/0 is NaN), which dequantizes to (-)0. inf makes the block's
 * absmax inf. The call still succeeds in all these cases.
 * One known exception to the bit-compatibility: in a block whose absmax is subnormal (below 1.2e-38),
 * bitsandbytes' CPU kernel multiplies by 1 / absmax, which overflows to inf, and gives codes of +/-1
 * or 0; kbit divides, and its codes are those of the true ratios (e.g. absmax 9e-41 with values 9e-41,
 * 4e-41, 0: kbit 255, 215, 131; bitsandbytes 255, 255, 0).
 * absmax must have room for ceil(n / blocksize) floats, out for n bytes.
 */
KBIT_API kbit_status kbit_quantize_blockwise_8bit(int dtype, const void* A, const float* code, uint8_t* out,
                                                  float* absmax, int64_t n, int32_t blocksize, void* stream);

/* out[i] = code[codes[i]] * absmax[i / blocksize], written as dtype. */
KBIT_API kbit_status kbit_dequantize_blockwise_8bit(int dtype, const uint8_t* codes, const float* code,
                                                    const float* absmax, void* out, int64_t n,
                                                    int32_t blocksize, void* stream);

/*
 * 4-bit blockwise quantization, NF4 or FP4 (bit-compatible with bitsandbytes' 4-bit layout).
 *
 * A holds n values of dtype. Codes are packed two per byte: value 2k in the high nibble of out[k],
 * value 2k + 1 in the low nibble; for odd n the last low nibble is the code of 0.0. out must have
 * room for ceil(n / 2) bytes, absmax for ceil(n / blocksize) floats.
 * For block b (values [b*blocksize, min((b+1)*blocksize, n))), with m = max |A[i]| (NaN if the block
 * holds a NaN) and s = max(m, 1e-38f) (NaN stays NaN):
 *   a full block stores absmax[b] = m and normalizes x = A[i] * (1.0f / s);
 *   a partial last block stores absmax[b] = s and normalizes x = A[i] / s;
 * and the code of A[i] is that of the codebook entry nearest to x: its rank among the 16 sorted
 * entries is the number of midpoints between neighbouring entries that x exceeds (ties go to the
 * lower entry; a NaN x takes the highest rank, so a NaN gives the code of +1.0, as does every value of
 * a block holding NaN; an inf makes the block's absmax inf, its own code that of NaN and every finite
 * value's that of 0). All float32, as bitsandbytes computes it. All these cases still return KBIT_OK.
 */
KBIT_API kbit_status kbit_quantize_4bit(int dtype, int quant_type, const void* A, uint8_t* out, float* absmax,
                                        int64_t n, int32_t blocksize, void* stream);

/* out[i] = codebook[code of value i] * absmax[i / blocksize] (float32 product), written as dtype. */
KBIT_API kbit_status kbit_dequantize_4bit(int dtype, int quant_type, const uint8_t* packed,
                                          const float* absmax, void* out, int64_t n, int32_t blocksize,
                                          void* stream);

/*
 * 4-bit GEMV (one token of inference): out = W' · A (+ bias), without materializing W'.
 *
 * W is a weight of n_out rows by k_in columns (row-major, as nn.Linear's weight) quantized as one flat
 * tensor of n_out * k_in values by kbit_quantize_4bit(quant_type, blocksize): packed holds
 * ceil(n_out * k_in / 2) bytes and absmax ceil(n_out * k_in / blocksize) floats; a block may straddle
 * two rows when k_in is not a multiple of blocksize. W'[j][k] is the dequantized value (codebook entry
 * times its block's absmax, float32). A holds k_in values of dtype, bias n_out values of dtype or is
 * NULL, out n_out values of dtype:
 *   out[j] = sum_k A[k] * W'[j][k] (+ bias[j]),
 * accumulated in float32 (the summation order is the kernel's), then rounded once to dtype.
 * out must not overlap A, bias, packed or absmax. n_out = 0 does nothing (pointers may be NULL);
 * k_in = 0 writes bias (or 0) to out and reads nothing else. A NaN/inf in a block of W reaches the
 * rows that block covers.
 */
KBIT_API kbit_status kbit_gemv_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                    const float* absmax, const void* bias, void* out, int64_t n_out,
                                    int64_t k_in, int32_t blocksize, void* stream);

/*
 * The 4-bit matmul: out = A W'^T (+ bias) for m_rows rows of A, W as for kbit_gemv_4bit. A holds
 * m_rows x k_in values of dtype (row-major), bias n_out values of dtype or is NULL, out m_rows x n_out
 * values of dtype:
 *   out[i][j] = sum_k A[i][k] * W'[j][k] (+ bias[j]),
 * accumulated in float32 (the summation order is the kernel's; on the CPU it does not depend on the
 * thread count or on m_rows), then rounded once to dtype. For dtype bfloat16 a kernel may round W' to
 * bfloat16 before multiplying (the CPU's AVX-512-BF16 path does, flushing subnormal W' to 0, as a
 * bfloat16 matmul of the dequantized weight would); float32 and float16 use W' exactly. The whole
 * weight is read once per call on the CPU (the CUDA kernel reads it once per row of A, from L2 for
 * small m_rows). out must not overlap the inputs. m_rows = 0 or n_out = 0 does nothing; k_in = 0
 * writes bias (or 0). KBIT_ERR_OUT_OF_MEMORY: the CPU's work buffers (m_rows x k_in and
 * m_rows x n_out floats) could not be allocated.
 */
KBIT_API kbit_status kbit_matmul_4bit(int dtype, int quant_type, const void* A, const uint8_t* packed,
                                      const float* absmax, const void* bias, void* out, int64_t m_rows,
                                      int64_t n_out, int64_t k_in, int32_t blocksize, void* stream);

/*
 * The CPU layout of a 4-bit weight ("tiled"), for the CPU's fastest matmul. W as for kbit_gemv_4bit,
 * with k_in a multiple of blocksize (so k_in is even and every row starts a block). The output columns
 * (rows of W) form groups of KBIT_TILED4_GROUP; group g holds columns j = g * 64 + c, c < 64, the
 * columns past n_out padded with code 0 and scale 0:
 *   tiled[(g * k_in/2 + p) * 64 + c]: the codes of W[j][2p] (low nibble) and W[j][2p + 1] (high nibble),
 *   scales[(g * k_in/blocksize + b) * 64 + 16 * (c % 4) + c / 4]: the absmax of row j's block b
 *     (absmax[j * k_in/blocksize + b]), in the kernels' lane order: lane i of vector v is column 4i + v,
 *     byte v of dword i of the pair's 64 bytes.
 * tiled holds ceil(n_out / 64) * 32 * k_in bytes, scales ceil(n_out / 64) * 64 * (k_in / blocksize)
 * floats. kbit_repack_4bit_tiled writes them from packed and the float32 absmax (a pure permutation:
 * nothing is rounded); KBIT_ERR_INVALID_ARGUMENT when k_in % blocksize != 0. CPU only: the CUDA
 * libraries return KBIT_ERR_NOT_IN_THIS_LIBRARY.
 */
#define KBIT_TILED4_GROUP 64
KBIT_API kbit_status kbit_repack_4bit_tiled(const uint8_t* packed, const float* absmax, uint8_t* tiled,
                                            float* scales, int64_t n_out, int64_t k_in, int32_t blocksize);

/*
 * kbit_matmul_4bit on the tiled layout: out[i][j] = sum_k A[i][k] * W'[j][k] (+ bias[j]) for m_rows rows
 * of A (m_rows x k_in values of dtype), accumulated in float32 in an order that depends neither on the
 * thread count nor on m_rows, rounded once to dtype. float32 and float16 use W' exactly. For bfloat16
 * on AVX-512-BF16 the codebook is rounded to bfloat16 (round to nearest even), the products with A
 * are summed per block in float32 (vdpbf16ps: subnormal inputs and sums flushed to 0) and each
 * block's sum is multiplied by its float32 absmax. Reads the weight once per 16 rows of A. out must
 * not overlap the inputs; m_rows = 0 or n_out = 0 does nothing; k_in = 0 writes bias (or 0).
 * KBIT_ERR_OUT_OF_MEMORY: the float32 copy of a float16/bfloat16 A could not be allocated. CPU only.
 */
KBIT_API kbit_status kbit_matmul_4bit_tiled(int dtype, int quant_type, const void* A, const uint8_t* tiled,
                                            const float* scales, const void* bias, void* out, int64_t m_rows,
                                            int64_t n_out, int64_t k_in, int32_t blocksize, void* stream);

/* Block of the 8-bit optimizers: one absmax per KBIT_OPTIM8_BLOCKSIZE values of each state. */
#define KBIT_OPTIM8_BLOCKSIZE 256

/*
 * One step of 8-bit blockwise Adam (decoupled_weight_decay = 0) or AdamW (1), in place.
 *
 * p and g hold n values of dtype; state1 (first moment m) and state2 (second moment v) n uint8 codes;
 * absmax1 and absmax2 ceil(n / KBIT_OPTIM8_BLOCKSIZE) floats; qmap1 (signed) and qmap2 (unsigned) are
 * KBIT_CODEBOOK8_SIZE float32 codebooks sorted ascending. For each value, all float32:
 *   g  = g * gnorm_scale                       (gnorm_scale = 1: no gradient scaling)
 *   Adam:  g += weight_decay * p               AdamW: p *= 1 - lr * weight_decay
 *   m  = beta1 * m + (1 - beta1) * g           (m, v dequantized: qmap[code] * absmax of the block)
 *   v  = beta2 * v + ((1 - beta2) * g) * g   (in this order, as torch's Adam: v stays finite for
 *                                              |g| up to ~5.8e20 at beta2 = 0.999)
 *   p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
 * the last line evaluated as torch.optim.Adam does: p -= step_size * (m / (sqrt(v) / bias2_sqrt + eps))
 * with step_size = lr / (1 - beta1^step) and bias2_sqrt = sqrt(1 - beta2^step) computed in double
 * from the float32 arguments, then rounded to float32 (csrc/common/kbit_optim_math.h, shared by the
 * CPU and CUDA kernels, every operation rounded on its own: the GPU's results equal the CPU's).
 * Then each block of m and v is requantized: its new absmax is the block's max |value| (NaN if the
 * block holds one), each value gets the code of the qmap entry nearest to value / absmax, ties to the
 * lower index (an all-zero block stores absmax 0 and codes of the entry nearest 0; a NaN gets code 0).
 * step >= 1 is the step count after this step. p is written back as dtype (rounded to nearest).
 * A non-finite g makes its own parameter and its block's states non-finite (absmax NaN or inf), so
 * from the next step on every parameter of that block, as in torch.optim.Adam; so does a finite g
 * whose term (1 - beta2) * g * g overflows float32 (where torch's second moment becomes inf as well);
 * skipping such steps is the caller's choice. The limit of 8-bit states: within a block, a second
 * moment below about 1.6e-7 of the block's largest is stored as 0 (half the unsigned dynamic map's
 * smallest entry), while a first moment down to 2.8e-7 of its block's largest is kept, so such a value
 * moves by step_size * m / eps: blocks whose gradients span more than about 2e3 in magnitude
 * (bitsandbytes' 8-bit Adam, with the same maps, shares this). All states must start zeroed. The qmaps
 * must be sorted ascending.
 * KBIT_ERR_INVALID_ARGUMENT (even for n = 0): beta1 or beta2 outside [0, 1), eps, weight_decay, lr
 * or gnorm_scale negative or not finite, step < 1, decoupled_weight_decay not 0 or 1, a float32
 * constant of the step that overflows (lr / (1 - beta1^step), AdamW's 1 - lr * weight_decay); for
 * n > 0 a NULL pointer.
 */
KBIT_API kbit_status kbit_adam_8bit_blockwise(int dtype, void* p, const void* g, uint8_t* state1,
                                              uint8_t* state2, float* absmax1, float* absmax2,
                                              const float* qmap1, const float* qmap2, float beta1,
                                              float beta2, float eps, float weight_decay, float lr,
                                              int32_t step, float gnorm_scale, int decoupled_weight_decay,
                                              int64_t n, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KBIT_H_ */
