/* A grouped 1x1 conv without bias (the DC-AE's LiteMLA multiscale branch: one group of `size`
 * channels per head of q, k and v), float32, on every core.
 *
 *   out[p, g size + o] = sum_i x[p, g size + i] * w[g size + o, i]   (w as the module holds it)
 *
 * The plain form is a batched matmul of one row per (pixel, group), thousands of tiny products MLX
 * runs one by one. Here the pixels are split between the pool's threads; each thread holds every
 * group's weight transposed ([i][o], from the L2 cache) and runs eight pixels at a time against a
 * group, their outputs in registers, each sum taken over i in order (acc + x w, two roundings: the
 * library is built without fused multiply-adds). size must be a multiple of 16.
 */
#include <stdlib.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec16.h"

#define PIXELS 8     /* pixels whose outputs stay in registers together */
#define MAX_VECTORS 4 /* size / 16 up to this many (sizes up to 64) */

struct grouped {
  const float *x, *w;
  float *out;
  long pixels;
  int groups, size;
  float *transposed; /* [groups][size (i)][size (o)] */
};

/* Outputs of pixels [p0, p0 + n) in group g, n <= PIXELS. */
CLONES16 static void block(const struct grouped *job, long p0, int n, int g) {
  const int size = job->size, vectors = size / 16, channels = job->groups * size;
  const float *wt = job->transposed + (size_t)g * size * size;
  v16f acc[PIXELS][MAX_VECTORS];
  for (int j = 0; j < PIXELS; j++)
    for (int v = 0; v < MAX_VECTORS; v++) acc[j][v] = (v16f){0};
  const float *rows[PIXELS];
  for (int j = 0; j < PIXELS; j++) rows[j] = job->x + (size_t)(p0 + (j < n ? j : 0)) * channels + (size_t)g * size;
  for (int i = 0; i < size; i++) {
    v16f w[MAX_VECTORS];
    for (int v = 0; v < vectors; v++) w[v] = load16f(wt + (size_t)i * size + 16 * v);
    for (int j = 0; j < PIXELS; j++) {
      const float s = rows[j][i];
      const v16f xs = {s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
      for (int v = 0; v < vectors; v++) acc[j][v] = acc[j][v] + xs * w[v];
    }
  }
  for (int j = 0; j < n; j++) {
    float *out = job->out + (size_t)(p0 + j) * channels + (size_t)g * size;
    for (int v = 0; v < vectors; v++) store16f(out + 16 * v, acc[j][v]);
  }
}

static void part(void *arg, int index, int parts) {
  const struct grouped *job = arg;
  const long begin = job->pixels * index / parts, end = job->pixels * (index + 1) / parts;
  for (long p0 = begin; p0 < end; p0 += PIXELS) {
    const int n = end - p0 < PIXELS ? (int)(end - p0) : PIXELS;
    for (int g = 0; g < job->groups; g++) block(job, p0, n, g);
  }
}

int mobileo_grouped_pointwise(const float *x, long pixels, int groups, int size, const float *w, float *out) {
  if (pixels < 1 || groups < 1 || size < 16 || size % 16 != 0 || size / 16 > MAX_VECTORS) return -1;
  float *transposed = malloc(sizeof(float) * (size_t)groups * size * size);
  if (transposed == NULL) return -2;
  for (int g = 0; g < groups; g++)
    for (int o = 0; o < size; o++)
      for (int i = 0; i < size; i++)
        transposed[((size_t)g * size + i) * size + o] = w[((size_t)g * size + o) * size + i];
  struct grouped job = {x, w, out, pixels, groups, size, transposed};
  /* below this many multiply-adds one thread does it (waking the others costs more) */
  const int parts = pixels * groups * size * size < (1L << 18) ? 1 : mobileo_pool_threads(0);
  if (mobileo_pool_run(part, &job, parts, 1) != 0) part(&job, 0, 1);
  free(transposed);
  return 0;
}
