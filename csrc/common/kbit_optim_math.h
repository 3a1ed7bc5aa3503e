/*
 * Per-value math of the 8-bit blockwise optimizers and the 4-bit GEMV, shared by the CPU and the
 * CUDA kernels (the same pattern as kbit_math.h: kernels load, reduce, store; the arithmetic of one
 * value lives here, so the CPU tests pin down what the GPU computes).
 *
 * Adam / AdamW of one value, all float32, in this order (torch.optim.Adam/AdamW's order):
 *   g  = g * gnorm_scale
 *   Adam:  g = g + weight_decay * p       AdamW: p = p * decay            (decay = 1 - lr * weight_decay)
 *   m  = beta1 * m + (1 - beta1) * g
 *   v  = beta2 * v + ((1 - beta2) * g) * g   (torch's addcmul order: v stays finite for |g| up to
 *                                            sqrt(FLT_MAX / (1 - beta2)), as torch's does)
 *   p  = p - step_size * (m / (sqrt(v) / bias2_sqrt + eps))
 * with step_size = lr / (1 - beta1^step) and bias2_sqrt = sqrt(1 - beta2^step), computed once per call
 * in double and rounded to float32 (kbit_adam_params). sqrt(v) / bias2_sqrt equals sqrt(v / (1 -
 * beta2^step)) of kbit.h up to rounding; this is how torch evaluates it.
 */
#ifndef KBIT_COMMON_KBIT_OPTIM_MATH_H_
#define KBIT_COMMON_KBIT_OPTIM_MATH_H_

#include <math.h>
#include <stdint.h>

#include "kbit_math.h"

/* Products and sums rounded one at a time on the GPU too: nvcc would otherwise fuse a * b + c into one
 * fma (a different rounding), while the host compilers do not contract (ISO C++ mode, no FMA in the
 * baseline x86-64 ISA). With these, division and sqrt (IEEE by default in CUDA), the GPU's step is
 * the CPU's bit for bit. */
#if defined(__CUDA_ARCH__)
#define KBIT_FMUL(a, b) __fmul_rn((a), (b))
#define KBIT_FADD(a, b) __fadd_rn((a), (b))
#define KBIT_FSUB(a, b) __fsub_rn((a), (b))
#else
#define KBIT_FMUL(a, b) ((a) * (b))
#define KBIT_FADD(a, b) ((a) + (b))
#define KBIT_FSUB(a, b) ((a) - (b))
#endif

/* The per-call constants of one Adam step, float32 (computed on the host). */
typedef struct KbitAdamParams {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float weight_decay; /* L2 coefficient added to the gradient (Adam); 0 for AdamW */
  float decay;        /* factor applied to p before the update (AdamW); 1 for Adam */
  float step_size;    /* lr / (1 - beta1^step) */
  float bias2_sqrt;   /* sqrt(1 - beta2^step) */
  float gnorm_scale;
} KbitAdamParams;

/* Host only: the constants of a step. Arguments must have been checked (check_adam8; the entry
 * points call prepare_adam8 of kbit_common.h, which does both). */
static inline KbitAdamParams kbit_adam_params(float beta1, float beta2, float eps, float weight_decay, float lr,
                                              int32_t step, float gnorm_scale, int decoupled) {
  KbitAdamParams q;
  q.beta1 = beta1;
  q.one_minus_beta1 = (float)(1.0 - (double)beta1);
  q.beta2 = beta2;
  q.one_minus_beta2 = (float)(1.0 - (double)beta2);
  q.eps = eps;
  q.weight_decay = decoupled ? 0.0f : weight_decay;
  q.decay = decoupled ? (float)(1.0 - (double)lr * (double)weight_decay) : 1.0f;
  q.step_size = (float)((double)lr / (1.0 - pow((double)beta1, (double)step)));
  q.bias2_sqrt = (float)sqrt(1.0 - pow((double)beta2, (double)step));
  q.gnorm_scale = gnorm_scale;
  return q;
}

/* Host only: whether a step's constants are finite (huge lr or weight_decay can overflow float32 in
 * lr / (1 - beta1^step) or 1 - lr * weight_decay); a caller refuses the step otherwise. */
static inline int kbit_adam_params_finite(const KbitAdamParams* q) {
  const float big = 3.4028234663852886e38f; /* FLT_MAX */
  return fabsf(q->step_size) <= big && fabsf(q->decay) <= big && fabsf(q->bias2_sqrt) <= big &&
         q->bias2_sqrt > 0.0f;
}

/* One value's step in two halves around sqrt(v), so a CPU kernel can take the square roots of a
 * whole buffer at once (an IEEE sqrt, correctly rounded like sqrtf: the same values either way).
 * First half: the gradient's scaling and weight decay, AdamW's decay of p, and the new moments. */
KBIT_HD void kbit_adam_moments(const KbitAdamParams* q, float* p, float g, float* m, float* v) {
  float pv = *p;
  g = KBIT_FMUL(g, q->gnorm_scale);
  g = KBIT_FADD(g, KBIT_FMUL(q->weight_decay, pv)); /* weight_decay is 0 for AdamW: g + 0 * p = g for finite p */
  *p = KBIT_FMUL(pv, q->decay);                     /* decay is 1 for Adam */
  *m = KBIT_FADD(KBIT_FMUL(q->beta1, *m), KBIT_FMUL(q->one_minus_beta1, g));
  *v = KBIT_FADD(KBIT_FMUL(q->beta2, *v), KBIT_FMUL(KBIT_FMUL(q->one_minus_beta2, g), g));
}

/* Second half: the parameter after the update, from the (decayed) p, the new m and sqrt(new v). */
KBIT_HD float kbit_adam_apply(const KbitAdamParams* q, float p, float m, float sqrt_v) {
  float denom = KBIT_FADD(sqrt_v / q->bias2_sqrt, q->eps);
  return KBIT_FSUB(p, KBIT_FMUL(q->step_size, m / denom));
}

/* One value's whole step: p, m, v updated in place (m, v are the dequantized states). */
KBIT_HD void kbit_adam_update(const KbitAdamParams* q, float* p, float g, float* m, float* v) {
  kbit_adam_moments(q, p, g, m, v);
  *p = kbit_adam_apply(q, *p, *m, sqrtf(*v));
}

/* The normalized value a state is requantized from: value / absmax, and 0 in an all-zero block
 * (absmax 0), so such a block gets the code of the entry nearest 0. A NaN absmax gives NaN. */
KBIT_HD float kbit_optim_normalize(float value, float absmax) { return absmax == 0.0f ? 0.0f : value / absmax; }

/* The 8-bit code of a normalized state: the nearest entry of the ascending 256-entry qmap (ties: the
 * lower index; binary search, kbit_nearest_code). A NaN gets code 0; its block's absmax is NaN too,
 * so it dequantizes to NaN either way. */
KBIT_HD uint8_t kbit_optim_code(const float* qmap, float x) { return kbit_nearest_code(qmap, x); }

/* |v| as bits: the IEEE order of non-negative floats is the integer order, NaN above inf, so a max
 * over these bits is a NaN-propagating max |v| (the blocks' new absmax). */
KBIT_HD uint32_t kbit_abs_bits(float v) { return kbit_f32_bits(v) & 0x7fffffffu; }

#endif /* KBIT_COMMON_KBIT_OPTIM_MATH_H_ */
