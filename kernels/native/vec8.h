/* 8-lane float / int32 vectors (GCC / Clang vector extensions) shared by the CPU kernels,
 * and the multiversioning of their hot loops: on x86-64 with GCC a loop marked MULTIVERSION
 * is compiled for x86-64-v3 (AVX2) and for the baseline, picked when the library loads. */
#ifndef MOBILEO_VEC8_H
#define MOBILEO_VEC8_H

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* Unaligned loads and stores (memcpy compiles to one vector move). */
static inline __attribute__((always_inline)) v8f load8f(const float *p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) v8i load8i(const void *p) {
  v8i v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) void store8f(float *p, v8f v) { memcpy(p, &v, sizeof v); }

#endif
