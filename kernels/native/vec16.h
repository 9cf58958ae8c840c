/* 16-lane float / int32 vectors (GCC / Clang vector extensions) for the element-wise kernels,
 * and their multiversioning: on x86-64 with GCC a function marked CLONES16 is compiled for
 * x86-64-v4 (AVX-512: one register a vector), x86-64-v3 (AVX2: two) and the baseline, picked
 * when the library loads. Each lane computes the same operations in the same order whatever
 * the width, so every clone gives the same bits. */
#ifndef MOBILEO_VEC16_H
#define MOBILEO_VEC16_H

#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES16 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES16
#endif

static inline __attribute__((always_inline)) v16f load16f(const float *p) {
  v16f v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) void store16f(float *p, v16f v) { memcpy(p, &v, sizeof v); }

/* Lanes [0, n) from p, the others 0 (a row's or an array's tail). */
static inline __attribute__((always_inline)) v16f load16f_part(const float *p, int n) {
  v16f v = {0};
  memcpy(&v, p, sizeof(float) * (size_t)n);
  return v;
}

static inline __attribute__((always_inline)) void store16f_part(float *p, v16f v, int n) {
  memcpy(p, &v, sizeof(float) * (size_t)n);
}

#endif
