/* Normalisations with their epilogues in one pass over memory, float32, on every core:
 *
 *   rms_norm_residual:    out = [residual +] (y * rsqrt(mean(y^2) + eps) * weight + bias)
 *                         (the DC-AE's RMSNorm with its bias, and the residual of its blocks)
 *   modulated_layer_norm: out = LayerNorm(x) * (1 + scale) + shift (no affine; SANA's AdaLN)
 *   gated_residual:       out = x + gate * update (SANA's gated residual)
 *
 * They replace MLX's CPU forms of the same formulas (mx.fast.rms_norm / layer_norm fall back to
 * element-wise and reduction ops there: a square, a sum, a multiply, an rsqrt, ... each one pass
 * on one thread per stream) with the same operations and roundings: the library is built without
 * fused multiply-adds, and each row's sum is accumulated in index order, one term at a time, as
 * MLX's CPU reduction sums a contiguous axis on x86-64 (each row's mx.sum is the running sum);
 * mean = sum * (1 / D), rsqrt(v) = 1 / sqrt(v). So each node gives the bits of its MLX form
 * (tests/test_elementwise.py).
 * The in-order sums are scalar chains: eight rows are summed side by side to keep the core busy.
 */
#include <math.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec16.h"

#define GROUP 8 /* rows summed side by side */

/* Where row r of an array with the layout `rows` starts, walked in order. */
struct cursor {
  long index[MOBILEO_MAX_ROW_DIMS];
  long offset;
};

static void cursor_at(const struct mobileo_rows *rows, long row, struct cursor *c) {
  c->offset = 0;
  for (int i = rows->dims - 1; i >= 0; i--) {
    c->index[i] = row % rows->shape[i];
    row /= rows->shape[i];
    c->offset += c->index[i] * rows->strides[i];
  }
}

static void cursor_next(const struct mobileo_rows *rows, struct cursor *c) {
  for (int i = rows->dims - 1; i >= 0; i--) {
    c->offset += rows->strides[i];
    if (++c->index[i] < rows->shape[i]) return;
    c->offset -= rows->strides[i] * rows->shape[i];
    c->index[i] = 0;
  }
}

/* sums[j] = sum over d in order of (p[j][d] - center[j])^2 (center NULL: of p[j][d]^2), or of
 * p[j][d] when square is 0. */
static inline __attribute__((always_inline)) void row_sums(const float *const *p, int dim, const float *center,
                                                            int square, float *sums) {
  float acc[GROUP] = {0};
  for (int d = 0; d < dim; d++)
    for (int j = 0; j < GROUP; j++) {
      const float v = center ? p[j][d] - center[j] : p[j][d];
      acc[j] = acc[j] + (square ? v * v : v);
    }
  for (int j = 0; j < GROUP; j++) sums[j] = acc[j];
}

static void parts_of(long total, int part, int parts, long *begin, long *end) {
  *begin = total * part / parts;
  *end = total * (part + 1) / parts;
}

static int parts_for(long values) {
  /* Below this many values one thread does it (waking the others costs more). */
  return values < (1L << 15) ? 1 : mobileo_pool_threads(0);
}

/* ------------------------------------------------------------------------- RMSNorm + residual */
struct rms_job {
  const float *y, *residual, *weight, *bias;
  const struct mobileo_rows *y_rows, *residual_rows;
  float eps, inverse_dim;
  long rows;
  int dim;
  float *out;
};

static inline __attribute__((always_inline)) void rms_row(const struct rms_job *job, const float *y,
                                                           const float *residual, float inv, float *out) {
  const v16f scale = {inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv};
  const int dim = job->dim;
  int d = 0;
  for (; d + 16 <= dim; d += 16) {
    v16f v = (load16f(y + d) * scale) * load16f(job->weight + d) + load16f(job->bias + d);
    if (residual) v = load16f(residual + d) + v;
    store16f(out + d, v);
  }
  if (d < dim) {
    const int n = dim - d;
    v16f v = (load16f_part(y + d, n) * scale) * load16f_part(job->weight + d, n) + load16f_part(job->bias + d, n);
    if (residual) v = load16f_part(residual + d, n) + v;
    store16f_part(out + d, v, n);
  }
}

CLONES16 static void rms_rows(const struct rms_job *job, long begin, long end) {
  struct cursor yc, rc = {{0}, 0};
  cursor_at(job->y_rows, begin, &yc);
  if (job->residual) cursor_at(job->residual_rows, begin, &rc);
  for (long r0 = begin; r0 < end; r0 += GROUP) {
    const int n = end - r0 < GROUP ? (int)(end - r0) : GROUP;
    const float *y[GROUP], *res[GROUP];
    for (int j = 0; j < GROUP; j++) {
      if (j < n) {
        y[j] = job->y + yc.offset;
        cursor_next(job->y_rows, &yc);
        if (job->residual) {
          res[j] = job->residual + rc.offset;
          cursor_next(job->residual_rows, &rc);
        }
      } else {
        y[j] = y[0]; /* summed and ignored */
      }
    }
    float sums[GROUP];
    row_sums(y, job->dim, NULL, 1, sums);
    for (int j = 0; j < n; j++) {
      const float inv = 1.0f / sqrtf(sums[j] * job->inverse_dim + job->eps);
      rms_row(job, y[j], job->residual ? res[j] : NULL, inv, job->out + (r0 + j) * job->dim);
    }
  }
}

static void rms_part(void *arg, int part, int parts) {
  const struct rms_job *job = arg;
  long begin, end;
  parts_of(job->rows, part, parts, &begin, &end);
  rms_rows(job, begin, end);
}

int mobileo_rms_norm_residual(const float *y, const struct mobileo_rows *y_rows, const float *residual,
                              const struct mobileo_rows *residual_rows, const float *weight, const float *bias,
                              float eps, long rows, int dim, float *out) {
  if (dim < 1 || rows < 0 || y_rows->dims > MOBILEO_MAX_ROW_DIMS ||
      (residual && residual_rows->dims > MOBILEO_MAX_ROW_DIMS))
    return -1;
  struct rms_job job = {y, residual, weight, bias, y_rows, residual_rows, eps, 1.0f / (float)dim, rows, dim, out};
  const int parts = parts_for(rows * dim);
  if (mobileo_pool_run(rms_part, &job, parts, 1) != 0) rms_part(&job, 0, 1);
  return 0;
}

void mobileo_rms_norm_residual_rows(const float *y, const float *residual, const float *weight, const float *bias,
                                    float eps, int dim, long begin, long end, float *out) {
  const struct mobileo_rows rows = {1, {end}, {dim}};
  const struct rms_job job = {y, residual, weight, bias, &rows, &rows, eps, 1.0f / (float)dim, end, dim, out};
  rms_rows(&job, begin, end);
}

/* ------------------------------------------------------------------ modulated LayerNorm */
struct layer_job {
  const float *x, *shift, *scale;
  float eps, inverse_dim;
  long tokens, rows;
  int dim;
  float *out;
  long out_first; /* the row out starts with */
};

CLONES16 static void layer_rows(const struct layer_job *job, long begin, long end) {
  const int dim = job->dim;
  for (long r0 = begin; r0 < end; r0 += GROUP) {
    const int n = end - r0 < GROUP ? (int)(end - r0) : GROUP;
    const float *x[GROUP];
    for (int j = 0; j < GROUP; j++) x[j] = job->x + (j < n ? r0 + j : r0) * dim;
    float mean[GROUP], var[GROUP];
    row_sums(x, dim, NULL, 0, mean);
    for (int j = 0; j < GROUP; j++) mean[j] = mean[j] * job->inverse_dim;
    row_sums(x, dim, mean, 1, var);
    for (int j = 0; j < n; j++) {
      const float inv = 1.0f / sqrtf(var[j] * job->inverse_dim + job->eps);
      const long b = (r0 + j) / job->tokens;
      const float *shift = job->shift + b * dim, *scale = job->scale + b * dim, *row = x[j];
      float *out = job->out + (r0 + j - job->out_first) * dim;
      const float m = mean[j];
      const v16f center = {m, m, m, m, m, m, m, m, m, m, m, m, m, m, m, m};
      const v16f factor = {inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv, inv};
      int d = 0;
      for (; d + 16 <= dim; d += 16)
        store16f(out + d, ((load16f(row + d) - center) * factor) * (1.0f + load16f(scale + d)) + load16f(shift + d));
      if (d < dim) {
        const int k = dim - d;
        store16f_part(out + d,
                      ((load16f_part(row + d, k) - center) * factor) * (1.0f + load16f_part(scale + d, k)) +
                          load16f_part(shift + d, k),
                      k);
      }
    }
  }
}

static void layer_part(void *arg, int part, int parts) {
  const struct layer_job *job = arg;
  long begin, end;
  parts_of(job->rows, part, parts, &begin, &end);
  layer_rows(job, begin, end);
}

int mobileo_modulated_layer_norm(const float *x, long batch, long tokens, int dim, const float *shift,
                                 const float *scale, float eps, float *out) {
  if (dim < 1 || batch < 0 || tokens < 1) return -1;
  struct layer_job job = {x, shift, scale, eps, 1.0f / (float)dim, tokens, batch * tokens, dim, out, 0};
  const int parts = parts_for(batch * tokens * dim);
  if (mobileo_pool_run(layer_part, &job, parts, 1) != 0) layer_part(&job, 0, 1);
  return 0;
}

void mobileo_modulated_layer_norm_rows(const float *x, long tokens, int dim, const float *shift, const float *scale,
                                       float eps, long begin, long end, float *out) {
  const struct layer_job job = {x, shift, scale, eps, 1.0f / (float)dim, tokens, end, dim, out, begin};
  layer_rows(&job, begin, end);
}

/* ------------------------------------------------------------------------- gated residual */
struct gated_job {
  const float *x, *gate, *update;
  long tokens, rows;
  int dim;
  float *out;
};

CLONES16 static void gated_rows(const struct gated_job *job, long begin, long end) {
  const int dim = job->dim;
  for (long r = begin; r < end; r++) {
    const float *x = job->x + r * dim, *update = job->update + r * dim, *gate = job->gate + r / job->tokens * dim;
    float *out = job->out + r * dim;
    int d = 0;
    for (; d + 16 <= dim; d += 16) store16f(out + d, load16f(x + d) + load16f(gate + d) * load16f(update + d));
    if (d < dim) {
      const int k = dim - d;
      store16f_part(out + d, load16f_part(x + d, k) + load16f_part(gate + d, k) * load16f_part(update + d, k), k);
    }
  }
}

static void gated_part(void *arg, int part, int parts) {
  const struct gated_job *job = arg;
  long begin, end;
  parts_of(job->rows, part, parts, &begin, &end);
  gated_rows(job, begin, end);
}

int mobileo_gated_residual(const float *x, const float *gate, const float *update, long batch, long tokens, int dim,
                           float *out) {
  if (dim < 1 || batch < 0 || tokens < 1) return -1;
  struct gated_job job = {x, gate, update, tokens, batch * tokens, dim, out};
  const int parts = parts_for(batch * tokens * dim);
  if (mobileo_pool_run(gated_part, &job, parts, 1) != 0) gated_part(&job, 0, 1);
  return 0;
}
