/* SiLU, x * sigmoid(x), and GLUMBConv's / Qwen2's gate a * silu(g) over float32 arrays, in
 * 16-lane vectors on every core.
 *
 * The same algorithm as backends/cpu/activations.py's silu and glu_silu (MLX element-wise
 * kernels there, compiled for baseline SSE2 and run on one thread per stream, several passes
 * over memory with their temporaries), with the same operations and roundings, so bit for bit
 * its results (the logistic: logistic16.h).
 */
#include "cpu_kernels.h"
#include "pool.h"
#include "logistic16.h"
#include "vec16.h"

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
};

static void silu_part(void *arg, long begin, long end) {
  const struct silu_job *job = arg;
  if (job->gate == NULL)
    silu_range(job->x, job->out, begin, end);
  else
    glu_range(job->x, job->gate, job->out, begin, end);
}

/* Below this many values one thread does it (waking the others costs more). */
#define PARALLEL_MIN_VALUES (1L << 15)

int mobileo_silu(const float *x, float *out, long count) {
  struct silu_job job = {x, NULL, out};
  mobileo_pool_run_ranges(silu_part, &job, count, 16, PARALLEL_MIN_VALUES);
  return 0;
}

int mobileo_glu_silu(const float *a, const float *g, float *out, long count) {
  struct silu_job job = {a, g, out};
  mobileo_pool_run_ranges(silu_part, &job, count, 16, PARALLEL_MIN_VALUES);
  return 0;
}
