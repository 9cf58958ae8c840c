/* Affine dequantization of MLX's packed 4- and 8-bit weights into float32, on every core.
 *
 * A prefill (more than a handful of rows) multiplies by the quantized weights through an
 * ordinary float32 GEMM, so each weight is first unpacked: w[n, k] = scale[n, g] * q[n, k]
 * + bias[n, g]. As MLX element-wise work that runs on one thread per stream; here output
 * rows are split between the threads of pool.c and each packed word becomes one 8-lane
 * vector (4-bit) or half of one (8-bit). The multiply and the add are rounded separately
 * (built without fused multiply-adds), as the MLX formula computes them.
 *
 * Layout (MLX's affine quantization): packed [N, K * bits / 32] uint32, value k of a row in
 * bits (bits * (k % per_word)) of word k / per_word; scales and biases [N, K / group].
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec8.h"

struct job {
  const uint32_t *packed;
  const float *scales, *biases;
  float *out;
  int n, k, bits, group;
};

typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

MULTIVERSION static void rows_4bit(const struct job *job, int n0, int n1) {
  const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  const int words = job->k / 8, groups = job->k / job->group, words_per_group = job->group / 8;
  for (int n = n0; n < n1; n++) {
    const uint32_t *w = job->packed + (size_t)n * words;
    float *out = job->out + (size_t)n * job->k;
    for (int g = 0; g < groups; g++) {
      const float s = job->scales[(size_t)n * groups + g], b = job->biases[(size_t)n * groups + g];
      for (int i = 0; i < words_per_group; i++, w++, out += 8) {
        const v8u word = (v8u){0} + *w;  /* the word in every lane, lane j keeps value j */
        const v8f q = __builtin_convertvector((v8i)((word >> shifts) & 15), v8f);
        store8f(out, q * s + b);
      }
    }
  }
}

MULTIVERSION static void rows_8bit(const struct job *job, int n0, int n1) {
  const int groups = job->k / job->group;
  for (int n = n0; n < n1; n++) {
    const uint8_t *q = (const uint8_t *)(job->packed + (size_t)n * (job->k / 4));
    float *out = job->out + (size_t)n * job->k;
    for (int g = 0; g < groups; g++) {
      const float s = job->scales[(size_t)n * groups + g], b = job->biases[(size_t)n * groups + g];
      for (int i = 0; i < job->group; i += 8, q += 8, out += 8) {
        v8b bytes;
        memcpy(&bytes, q, sizeof bytes);
        store8f(out, __builtin_convertvector(bytes, v8f) * s + b);
      }
    }
  }
}

static void run_part(void *arg, int part, int parts) {
  const struct job *job = arg;
  const int n0 = (int)((long)job->n * part / parts), n1 = (int)((long)job->n * (part + 1) / parts);
  if (job->bits == 4)
    rows_4bit(job, n0, n1);
  else
    rows_8bit(job, n0, n1);
}

/* Below this many weights one thread does it all (waking a worker costs more than it saves). */
#define PARALLEL_MIN_WEIGHTS (1 << 16)

int mobileo_dequantize(const uint32_t *packed, const float *scales, const float *biases, int n, int k, int bits,
                       int group, float *out) {
  if ((bits != 4 && bits != 8) || group <= 0 || group % 8 || k % group) return -1;
  struct job job = {packed, scales, biases, out, n, k, bits, group};
  int parts = mobileo_pool_threads(0);
  if ((long)n * k < PARALLEL_MIN_WEIGHTS || n < parts) parts = 1;
  mobileo_pool_run(run_part, &job, parts, 1);
  return 0;
}
