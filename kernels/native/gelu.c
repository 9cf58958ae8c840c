/* Exact (erf) GELU over float32 arrays, vectorised and on every core.
 *
 * The same algorithm as models/activations.py's CPU form (MLX element-wise kernels there,
 * which MLX compiles for baseline SSE2 and runs on one thread per stream, ~5 ns a value):
 *
 *   gelu(x) = x * Phi(x),  Phi(-a) = exp(-a^2/2) * erfcx(a/sqrt2)/2,  a = min(|x|, 13.28125)
 *
 * erfcx(a/sqrt2)/2 is a degree-9 polynomial in t = 1/(1 + a/(2 sqrt2)); exp(-a^2/2) is
 * split at a_hi (the top 12 significant bits of a, so a_hi^2 is exact) into 2^n exp(r)
 * (a [3/3] Pade approximant) times a degree-4 Taylor factor for the small rest. Relative
 * error ~3e-7 wherever Phi(-a) is a normal float. Compiled without contraction of
 * multiply-adds, so the operations (and roundings) are the MLX form's.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec8.h"

#define SQRT8 2.8284271247461903
#define LOG2E 1.4426950408889634
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define ABS_MASK 0x7FFFFFFF
#define INF_BITS 0x7F800000
#define HI_MASK (~0xFFF)
#define BOUND_BITS 0x41548000 /* 13.28125f */

static const float ERFCX_HALF[10] = {-3.58358974e-06f, 1.41122322e-01f, 1.40450309e-01f, 1.25363957e-01f,
                                     8.92692682e-02f,  1.10537145e-02f, 1.07601864e-01f, -2.18526029e-01f,
                                     1.31026879e-01f,  -2.73587168e-02f};

static inline __attribute__((always_inline)) v8f gelu8(v8f x) {
  const float *c = ERFCX_HALF;
  const v8i bits = (v8i)x;
  /* a = min(|x|, bound) in the integer domain, NaN kept */
  const v8i magnitude = bits & ABS_MASK;
  const v8i over = magnitude - BOUND_BITS;
  const v8i clamped = magnitude - (over & ~(over >> 31));
  const v8i nan = (INF_BITS - magnitude) >> 31;
  const v8i a_bits = (clamped & ~nan) | (magnitude & nan);
  const v8f a = (v8f)a_bits, a_hi = (v8f)(a_bits & HI_MASK);
  /* exp(-a_hi^2 / 2) = 2^n exp(r) */
  const v8f square = a_hi * a_hi;
  const v8i scale_bits = __builtin_convertvector(square * (float)(-0.5 * LOG2E) + 127.5f, v8i) << 23;
  const v8f n = __builtin_convertvector(scale_bits >> 23, v8f) - 127.0f;
  const v8f r = (square * -0.5f - n * LN2_HI) - n * LN2_LO;
  /* erfcx(a/sqrt2)/2 * exp(-a_lo (a + a_hi)/2) */
  const v8f t = (float)SQRT8 / ((float)SQRT8 + a);
  const v8f t2 = t * t, t4 = t2 * t2;
  const v8f low = (c[0] + c[1] * t) + (c[2] + c[3] * t) * t2;
  const v8f high = (c[4] + c[5] * t) + (c[6] + c[7] * t) * t2;
  const v8f poly = (low + high * t4) + (c[8] + c[9] * t) * (t4 * t4);
  const v8f d = (a - a_hi) * (a + a_hi) * -0.5f;
  const v8f d2 = d * d;
  const v8f half_erfcx = poly * ((1.0f + d) + d2 * ((0.5f + d * (float)(1.0 / 6.0)) + d2 * (float)(1.0 / 24.0)));
  /* exp(r) = num / den */
  const v8f r2 = r * r;
  const v8f even = 1.0f + r2 * 0.1f;
  const v8f odd = r * (0.5f + r2 * (float)(1.0 / 120.0));
  const v8f num = even + odd, den = even - odd;
  const v8f tail = half_erfcx * ((v8f)scale_bits * num) / den; /* Phi(-|x|) */
  const v8f positive = 1.0f + __builtin_convertvector(bits >> 31, v8f);
  return x * (positive + (1.0f - 2.0f * positive) * tail);
}

MULTIVERSION static void gelu_range(const float *x, float *out, long begin, long end) {
  long i = begin;
  for (; i + 8 <= end; i += 8) store8f(out + i, gelu8(load8f(x + i)));
  if (i < end) { /* the tail through one padded vector */
    float in[8] = {0}, res[8];
    memcpy(in, x + i, sizeof(float) * (size_t)(end - i));
    store8f(res, gelu8(load8f(in)));
    memcpy(out + i, res, sizeof(float) * (size_t)(end - i));
  }
}

struct gelu_job {
  const float *x;
  float *out;
};

static void gelu_part(void *arg, long begin, long end) {
  const struct gelu_job *job = arg;
  gelu_range(job->x, job->out, begin, end);
}

/* Below this many values one thread does it (waking the others costs more). */
#define PARALLEL_MIN_VALUES (1L << 15)

/* out[i] = gelu(x[i]) for i < count (out may be x). Returns 0. */
int mobileo_gelu(const float *x, float *out, long count) {
  struct gelu_job job = {x, out};
  mobileo_pool_run_ranges(gelu_part, &job, count, 8, PARALLEL_MIN_VALUES);
  return 0;
}
