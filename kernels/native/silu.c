/* SiLU, x * sigmoid(x), and GLUMBConv's / Qwen2's gate a * silu(g) over float32 arrays, in
 * 16-lane vectors on every core.
 *
 * The same algorithm as backends/cpu/activations.py's silu and glu_silu (MLX element-wise
 * kernels there, compiled for baseline SSE2 and run on one thread per stream, several passes
 * over memory with their temporaries), with the same operations and roundings (the library is
 * built without fused multiply-adds), so bit for bit its results:
 *
 *   a = min(|x|, 88) in the integer domain (NaN kept); exp(-a) = 2^n exp(r), n = round(-a log2 e),
 *   r = (-a - n ln2_hi) - n ln2_lo; exp(r) = num / den ([3/3] Pade); e = 2^n num;
 *   sigmoid(x) = (m den + (1 - m) e) / (den + e), m = 1 for x >= +0, 0 for x <= -0.
 *
 * The same logistic as gated_depthwise.c's logistic8, 16 lanes wide.
 */
#include "cpu_kernels.h"
#include "pool.h"
#include "vec16.h"

#define LOG2E 1.4426950408889634
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define ABS_MASK 0x7FFFFFFF
#define INF_BITS 0x7F800000
#define BOUND_BITS 0x42B00000 /* 88.0f: exp(-88) is below FLT_MIN, 2^n flushes to 0 from there */

static inline __attribute__((always_inline)) v16f logistic16(v16f x) {
  const v16i bits = (v16i)x;
  const v16i magnitude = bits & ABS_MASK;
  const v16i over = magnitude - BOUND_BITS;
  const v16i clamped = magnitude - (over & ~(over >> 31));
  const v16i nan = (INF_BITS - magnitude) >> 31;
  const v16f a = (v16f)((clamped & ~nan) | (magnitude & nan));
  const v16i scale_bits = __builtin_convertvector(a * (float)(-LOG2E) + 127.5f, v16i) << 23;
  const v16f n = __builtin_convertvector(scale_bits >> 23, v16f) - 127.0f;
  const v16f r = (-a - n * LN2_HI) - n * LN2_LO;
  const v16f r2 = r * r;
  const v16f even = 1.0f + r2 * 0.1f;
  const v16f odd = r * (0.5f + r2 * (float)(1.0 / 120.0));
  const v16f num = even + odd, den = even - odd;
  const v16f tail = (v16f)scale_bits * num;
  const v16f positive = 1.0f + __builtin_convertvector(bits >> 31, v16f);
  return (positive * den + (1.0f - positive) * tail) / (den + tail);
}

CLONES16 static void silu_range(const float *x, float *out, long begin, long end) {
  long i = begin;
  for (; i + 16 <= end; i += 16) {
    const v16f v = load16f(x + i);
    store16f(out + i, v * logistic16(v));
  }
  if (i < end) {
    const v16f v = load16f_part(x + i, (int)(end - i));
    store16f_part(out + i, v * logistic16(v), (int)(end - i));
  }
}

/* a * (g * sigmoid(g)): activations._glu_out's order */
CLONES16 static void glu_range(const float *a, const float *g, float *out, long begin, long end) {
  long i = begin;
  for (; i + 16 <= end; i += 16) {
    const v16f gate = load16f(g + i);
    store16f(out + i, load16f(a + i) * (gate * logistic16(gate)));
  }
  if (i < end) {
    const int n = (int)(end - i);
    const v16f gate = load16f_part(g + i, n);
    store16f_part(out + i, load16f_part(a + i, n) * (gate * logistic16(gate)), n);
  }
}

struct silu_job {
  const float *x, *gate; /* gate NULL: silu(x); else x * silu(gate) */
  float *out;
  long count;
};

static void silu_part(void *arg, int part, int parts) {
  const struct silu_job *job = arg;
  /* split on multiples of 16 so every part but the last is whole vectors */
  const long vectors = (job->count + 15) / 16;
  const long begin = vectors * part / parts * 16, end_ = vectors * (part + 1) / parts * 16;
  const long end = end_ < job->count ? end_ : job->count;
  if (job->gate == NULL)
    silu_range(job->x, job->out, begin, end);
  else
    glu_range(job->x, job->gate, job->out, begin, end);
}

/* Below this many values one thread does it (waking the others costs more). */
#define PARALLEL_MIN_VALUES (1L << 15)

static void run(struct silu_job *job) {
  int parts = mobileo_pool_threads(0);
  if (job->count < PARALLEL_MIN_VALUES) parts = 1;
  if (mobileo_pool_run(silu_part, job, parts, 1) != 0) silu_part(job, 0, 1);
}

int mobileo_silu(const float *x, float *out, long count) {
  struct silu_job job = {x, NULL, out, count};
  run(&job);
  return 0;
}

int mobileo_glu_silu(const float *a, const float *g, float *out, long count) {
  struct silu_job job = {a, g, out, count};
  run(&job);
  return 0;
}
