/* sigmoid(x) over 16 float32 lanes, bit for bit backends/cpu/activations.py's MLX form
 * (_logistic_parts + _logistic; the library is built without fused multiply-adds):
 *
 *   a = min(|x|, 88) in the integer domain (NaN kept); exp(-a) = 2^n exp(r), n = round(-a log2 e),
 *   r = (-a - n ln2_hi) - n ln2_lo; exp(r) = num / den ([3/3] Pade); e = 2^n num;
 *   sigmoid(x) = (m den + (1 - m) e) / (den + e), m = 1 for x >= +0, 0 for x <= -0.
 *
 * Shared by silu.c and gated_depthwise.c. */
#ifndef MOBILEO_LOGISTIC16_H
#define MOBILEO_LOGISTIC16_H

#include "vec16.h"

#define LOGISTIC_LOG2E 1.4426950408889634
#define LOGISTIC_LN2_HI 0.693359375f
#define LOGISTIC_LN2_LO -2.12194440e-4f
#define LOGISTIC_ABS_MASK 0x7FFFFFFF
#define LOGISTIC_INF_BITS 0x7F800000
#define LOGISTIC_BOUND_BITS 0x42B00000 /* 88.0f: exp(-88) is below FLT_MIN, 2^n flushes to 0 from there */

static inline __attribute__((always_inline)) v16f logistic16(v16f x) {
  const v16i bits = (v16i)x;
  const v16i magnitude = bits & LOGISTIC_ABS_MASK;
  const v16i over = magnitude - LOGISTIC_BOUND_BITS;
  const v16i clamped = magnitude - (over & ~(over >> 31));
  const v16i nan = (LOGISTIC_INF_BITS - magnitude) >> 31;
  const v16f a = (v16f)((clamped & ~nan) | (magnitude & nan));
  /* exp(-a) = 2^n exp(r) */
  const v16i scale_bits = __builtin_convertvector(a * (float)(-LOGISTIC_LOG2E) + 127.5f, v16i) << 23;
  const v16f n = __builtin_convertvector(scale_bits >> 23, v16f) - 127.0f;
  const v16f r = (-a - n * LOGISTIC_LN2_HI) - n * LOGISTIC_LN2_LO;
  const v16f r2 = r * r;
  const v16f even = 1.0f + r2 * 0.1f;
  const v16f odd = r * (0.5f + r2 * (float)(1.0 / 120.0));
  const v16f num = even + odd, den = even - odd;
  const v16f tail = (v16f)scale_bits * num;
  /* The MLX form's numerator m den + (1 - m) tail with m = 1 or 0: den or tail exactly (both
   * finite and non-negative), chosen here by the sign bit. */
  const v16i negative = bits >> 31;
  const v16f numerator = (v16f)(((v16i)den & ~negative) | ((v16i)tail & negative));
  return numerator / (den + tail);
}

#endif
