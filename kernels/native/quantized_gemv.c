/* Affine-quantized matrix-vector products for MLX's CPU backend (a few input rows).
 *
 * Decoding a token multiplies one row by every weight of the language model once. MLX's
 * CPU quantized_matmul does that in a scalar loop on one thread (~1 ns a 4-bit weight);
 * this kernel reads the same packed weights (MLX's layout, untouched) with 8-lane vectors
 * on every core.
 *
 * Layout (MLX's affine quantization, transpose=True): packed [N, K * bits / 32] uint32,
 * value k of a row in bits (bits * (k % per_word)) of word k / per_word, little-endian;
 * scales and biases [N, K / group] float32; w[n, k] = scale[n, g] * q[n, k] + bias[n, g].
 *
 *   y[r, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] x[r, k]) + bias[n, g] * xsum[r, g]
 *
 * Eight consecutive words are one vector: lane i holds values per_word * i + j (slot j).
 * The input is permuted once per call so that slot j of a chunk is one contiguous vector,
 * so the inner loop is shift, mask, convert, multiply-add. Rows of the output are split
 * between the threads of pool.c.
 *
 * Written for GCC / Clang vector extensions; on x86-64 the hot function is compiled twice
 * (x86-64-v3, i.e. AVX2, and baseline) and picked at load time.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec8.h"

#define MAX_ROWS 8

struct job {
  const float *xt;     /* [R, K] permuted input */
  const float *xsum;   /* [R, G] input sums per group */
  const uint32_t *packed;
  const float *scales, *biases;
  float *out;          /* [R, N] */
  int rows, n, k, bits, group;
};

static inline __attribute__((always_inline)) float hsum(v8f v) {
  float s = 0.0f;
  for (int i = 0; i < 8; i++) s += v[i];
  return s;
}

/* Output rows [n0, n1) for R input rows; BITS and R are constants after inlining. */
static inline __attribute__((always_inline)) void rows_kernel(const struct job *job, int n0, int n1,
                                                              const int R, const int BITS) {
  const int per_word = 32 / BITS;
  const int32_t mask = (1 << BITS) - 1;
  const int words = job->k / per_word;            /* per weight row */
  const int groups = job->k / job->group;
  const int chunks_per_group = job->group / (8 * per_word);
  for (int n = n0; n < n1; n++) {
    const uint32_t *w = job->packed + (size_t)n * words;
    const float *scale = job->scales + (size_t)n * groups;
    const float *bias = job->biases + (size_t)n * groups;
    v8f acc[MAX_ROWS];
    float offset[MAX_ROWS];
    for (int r = 0; r < R; r++) {
      acc[r] = (v8f){0};
      offset[r] = 0.0f;
    }
    const float *xt = job->xt;
    for (int g = 0; g < groups; g++) {
      v8f part[MAX_ROWS];
      for (int r = 0; r < R; r++) part[r] = (v8f){0};
      for (int c = 0; c < chunks_per_group; c++) {
        const v8i packed = load8i(w);
        w += 8;
        for (int j = 0; j < per_word; j++) {
          const v8f q = __builtin_convertvector((packed >> (BITS * j)) & mask, v8f);
          for (int r = 0; r < R; r++) part[r] += q * load8f(xt + (size_t)r * job->k + 8 * j);
        }
        xt += 8 * per_word;
      }
      const float s = scale[g], b = bias[g];
      for (int r = 0; r < R; r++) {
        acc[r] += s * part[r];
        offset[r] += b * job->xsum[(size_t)r * groups + g];
      }
    }
    for (int r = 0; r < R; r++) job->out[(size_t)r * job->n + n] = hsum(acc[r]) + offset[r];
  }
}

#define CASE_ROWS(R)                                  \
  case R:                                             \
    if (job->bits == 4) rows_kernel(job, n0, n1, R, 4); \
    else rows_kernel(job, n0, n1, R, 8);              \
    break;

MULTIVERSION static void run_slice(const struct job *job, int n0, int n1) {
  switch (job->rows) {
    CASE_ROWS(1) CASE_ROWS(2) CASE_ROWS(3) CASE_ROWS(4)
    CASE_ROWS(5) CASE_ROWS(6) CASE_ROWS(7) CASE_ROWS(8)
  }
}

static void run_part(void *arg, int part, int parts) {
  const struct job *job = arg;
  run_slice(job, (int)((long)job->n * part / parts), (int)((long)job->n * (part + 1) / parts));
}

/* ------------------------------------------------------------------ entry points */

int mobileo_quantized_gemv_threads(int threads) { return mobileo_pool_threads(threads); }

/* Below this many weights a product runs on the calling thread (waking a worker costs
 * more than it saves). */
#define PARALLEL_MIN_WEIGHTS (1 << 18)

/* x [rows, k], out [rows, n] (float32, contiguous). Returns 0, or -1 when the shape is
 * not supported here (the caller falls back to MLX). Calls from several threads take turns. */
int mobileo_quantized_gemv(const float *x, int rows, int k, const uint32_t *packed, const float *scales,
                           const float *biases, int n, int bits, int group, float *out) {
  if (rows < 1 || rows > MAX_ROWS || n < 1 || k < 1 || (bits != 4 && bits != 8) || group < 1) return -1;
  const int per_word = 32 / bits;
  if (k % group || group % (8 * per_word)) return -1;
  const int groups = k / group;

  float *xt = malloc(sizeof(float) * ((size_t)rows * k + (size_t)rows * groups));
  if (!xt) return -1;
  float *xsum = xt + (size_t)rows * k;
  const int chunk = 8 * per_word; /* input values under one vector of words */
  for (int r = 0; r < rows; r++) {
    const float *src = x + (size_t)r * k;
    float *dst = xt + (size_t)r * k;
    for (int base = 0; base < k; base += chunk)
      for (int j = 0; j < per_word; j++)
        for (int i = 0; i < 8; i++) dst[base + 8 * j + i] = src[base + per_word * i + j];
    for (int g = 0; g < groups; g++) {
      float s = 0.0f;
      for (int i = 0; i < group; i++) s += src[(size_t)g * group + i];
      xsum[(size_t)r * groups + g] = s;
    }
  }

  struct job job = {xt, xsum, packed, scales, biases, out, rows, n, k, bits, group};
  int parts = mobileo_pool_threads(0);
  if ((long)n * k < PARALLEL_MIN_WEIGHTS || n < 2 * parts) parts = 1;
  mobileo_pool_run(run_part, &job, parts, 1);
  free(xt);
  return 0;
}
