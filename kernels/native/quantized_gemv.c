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
 * between a small pool of threads (created on first use, asleep between calls).
 *
 * Written for GCC / Clang vector extensions; on x86-64 the hot function is compiled twice
 * (AVX2 + FMA and baseline) and picked at load time.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define MAX_ROWS 8
#define MAX_THREADS 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

struct job {
  const float *xt;     /* [R, K] permuted input */
  const float *xsum;   /* [R, G] input sums per group */
  const uint32_t *packed;
  const float *scales, *biases;
  float *out;          /* [R, N] */
  int rows, n, k, bits, group;
};

static inline __attribute__((always_inline)) v8f load8f(const float *p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) v8i load8i(const uint32_t *p) {
  v8i v;
  memcpy(&v, p, sizeof v);
  return v;
}

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

/* ------------------------------------------------------------------ thread pool */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static int pool_threads = 0;      /* threads taking part, the caller included (0: not set) */
static int pool_started = 0;      /* worker threads running */
static unsigned long pool_generation = 0;
static int pool_pending = 0;
static int pool_active = 1;       /* slices in the current job */
static const struct job *pool_job = NULL;
static unsigned long worker_seen[MAX_THREADS]; /* the generation each worker last ran */

static void slice_bounds(int n, int parts, int index, int *n0, int *n1) {
  *n0 = (int)((long)n * index / parts);
  *n1 = (int)((long)n * (index + 1) / parts);
}

static void *worker(void *arg) {
  const int index = (int)(intptr_t)arg;
  pthread_mutex_lock(&pool_lock);
  unsigned long seen = worker_seen[index]; /* set by its creator, under the lock */
  for (;;) {
    while (pool_generation == seen) pthread_cond_wait(&pool_start, &pool_lock);
    seen = pool_generation;
    const struct job *job = pool_job;
    const int parts = pool_active;
    pthread_mutex_unlock(&pool_lock);
    if (index < parts) {
      int n0, n1;
      slice_bounds(job->n, parts, index, &n0, &n1);
      run_slice(job, n0, n1);
    }
    pthread_mutex_lock(&pool_lock);
    if (--pool_pending == 0) pthread_cond_signal(&pool_done);
  }
  return NULL;
}

static int default_threads(void) {
  int count = 0;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) count = CPU_COUNT(&set);
#endif
  if (count <= 0) count = (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (count <= 0) count = 1;
  return count > MAX_THREADS ? MAX_THREADS : count;
}

/* A forked child has none of the parent's workers: start again from nothing. */
static void reset_after_fork(void) {
  pthread_mutex_init(&pool_lock, NULL);
  pthread_cond_init(&pool_start, NULL);
  pthread_cond_init(&pool_done, NULL);
  pool_started = 0;
  pool_pending = 0;
}

static void ensure_workers(int threads) {
  static int atfork_registered = 0;
  if (!atfork_registered) {
    pthread_atfork(NULL, NULL, reset_after_fork);
    atfork_registered = 1;
  }
  while (pool_started < threads - 1) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    worker_seen[pool_started + 1] = pool_generation;
    if (pthread_create(&thread, &attr, worker, (void *)(intptr_t)(pool_started + 1)) != 0) {
      pthread_attr_destroy(&attr);
      break;
    }
    pthread_attr_destroy(&attr);
    pool_started++;
  }
}

/* ------------------------------------------------------------------ entry points */

int mobileo_quantized_gemv_threads(int threads) {
  if (threads > 0) pool_threads = threads > MAX_THREADS ? MAX_THREADS : threads;
  if (pool_threads == 0) pool_threads = default_threads();
  return pool_threads;
}

/* Below this many weights a product runs on the calling thread (waking a worker costs
 * more than it saves). */
#define PARALLEL_MIN_WEIGHTS (1 << 18)

/* x [rows, k], out [rows, n] (float32, contiguous). Returns 0, or -1 when the shape is
 * not supported here (the caller falls back to MLX). Not reentrant: one call at a time. */
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
  int parts = mobileo_quantized_gemv_threads(0);
  if ((long)n * k < PARALLEL_MIN_WEIGHTS || n < 2 * parts) parts = 1;
  if (parts > 1) {
    pthread_mutex_lock(&pool_lock);
    ensure_workers(parts);
    if (parts > pool_started + 1) parts = pool_started + 1;
    if (parts > 1) {
      pool_job = &job;
      pool_active = parts;
      pool_pending = pool_started;
      pool_generation++;
      pthread_cond_broadcast(&pool_start);
    }
    pthread_mutex_unlock(&pool_lock);
  }
  int n0, n1;
  slice_bounds(n, parts, 0, &n0, &n1);
  run_slice(&job, n0, n1);
  if (parts > 1) {
    pthread_mutex_lock(&pool_lock);
    while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
  }
  free(xt);
  return 0;
}
