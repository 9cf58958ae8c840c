/* GLUMBConv's gated middle in one pass, NHWC float32, on every core:
 *
 *   D = depthwise_conv(silu(h)) + bias over 2C channels (k x k, stride 1, padding k/2)
 *   out[..., c] = D[..., c] * silu(D[..., C + c])                     (c < C)
 *
 * The CPU form it replaces (backends/cpu/layers.gated_depthwise) runs these as MLX kernels on
 * one thread per stream and writes silu(h), both conv halves and their temporaries to memory.
 * Here the pool's threads take (image, block of BLOCK value channels and their gate channels)
 * units; a unit walks down the image keeping the k rows of silu(h) its next output row reads in
 * a small buffer (each input's SiLU computed once), zero-padded at the borders, so every output
 * pixel sums all k*k taps without a bounds check. 16 channels a vector (a hidden size that is
 * an odd multiple of 8 ends on a half vector, its upper lanes zero in the buffer and never
 * stored), four output pixels a step with both halves' accumulators in registers.
 *
 * Bit for bit the CPU form's MLX arithmetic (the library is built without fused multiply-adds):
 * SiLU as backends/cpu/activations.silu (|x| clamped in the integer domain, exp(-|x|) as 2^n
 * times a [3/3] Pade approximant), the taps summed in the shift-and-add twin's order (tap (0,0)
 * first, padding contributing 0 * w, the bias last) and the gate as activations.glu_silu.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "pool.h"
#include "vec8.h"
#include "logistic16.h"
#include "vec16.h"

/* Value channels per unit (and as many gate channels): a whole number of 16-lane vectors, its
 * row buffer in L2; a pixel's block is eight cache lines in a row of each half. */
#ifndef BLOCK
#define BLOCK 256
#endif
#define VECTORS (BLOCK / 16)

/* LANES (16, or 8 for a half vector) floats from p, the upper lanes 0. */
static inline __attribute__((always_inline)) v16f load_lanes(const float *p, const int LANES) {
  if (LANES == 16) return load16f(p);
  const v8f low = load8f(p);
  return __builtin_shufflevector(low, (v8f){0}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

static inline __attribute__((always_inline)) void store_lanes(float *p, v16f v, const int LANES) {
  if (LANES == 16)
    store16f(p, v);
  else
    store8f(p, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
}

struct gated {
  const float *h, *taps, *bias; /* h [B, H, W, 2C], taps [k, k, 2C], bias [2C] or NULL */
  float *out;                   /* [B, H, W, C] */
  float *scratch;               /* part_floats per part */
  size_t part_floats;
  int batch, height, width, hidden, k;
  int pitch;  /* pixels per buffered row of one channel vector: W + 2 (k/2), + 3 read past by the last group */
  int blocks; /* channel blocks per image */
};

/* Four output pixels (n of them stored) of one channel vector: both conv halves summed tap by
 * tap in the twin's order, the bias last, then the gate. */
static inline __attribute__((always_inline)) void pixels(const float *const *rows, size_t value_at, size_t gate_at,
                                                          const float *w_value, const float *w_gate, int channels,
                                                          const float *bias, int hidden, float *out, int n,
                                                          const int K, const int LANES) {
  v16f value[4], gate[4];
  {
    const v16f wv = load_lanes(w_value, LANES), wg = load_lanes(w_gate, LANES);
    for (int i = 0; i < 4; i++) {
      value[i] = load16f(rows[0] + value_at + 16 * i) * wv;
      gate[i] = load16f(rows[0] + gate_at + 16 * i) * wg;
    }
  }
#pragma GCC unroll 49
  for (int tap = 1; tap < K * K; tap++) {
    const int dy = tap / K, dx = tap % K;
    const v16f wv = load_lanes(w_value + (size_t)tap * channels, LANES),
               wg = load_lanes(w_gate + (size_t)tap * channels, LANES);
    const float *in_value = rows[dy] + value_at + (size_t)dx * 16, *in_gate = rows[dy] + gate_at + (size_t)dx * 16;
    for (int i = 0; i < 4; i++) {
      value[i] = value[i] + load16f(in_value + 16 * i) * wv;
      gate[i] = gate[i] + load16f(in_gate + 16 * i) * wg;
    }
  }
  if (bias) {
    const v16f bv = load_lanes(bias, LANES), bg = load_lanes(bias + hidden, LANES);
    for (int i = 0; i < 4; i++) {
      value[i] = value[i] + bv;
      gate[i] = gate[i] + bg;
    }
  }
  if (n == 4) {
    for (int i = 0; i < 4; i++) store_lanes(out + (size_t)i * hidden, value[i] * (gate[i] * logistic16(gate[i])), LANES);
  } else {
    for (int i = 0; i < 4; i++)
      if (i < n) store_lanes(out + (size_t)i * hidden, value[i] * (gate[i] * logistic16(gate[i])), LANES);
  }
}

/* One output row's pixels of one channel vector. */
static inline __attribute__((always_inline)) void vector_row(const float *const *rows, size_t value_at,
                                                              size_t gate_at, const float *w_value,
                                                              const float *w_gate, int channels, const float *bias,
                                                              int hidden, float *out_row, int width, const int K,
                                                              const int LANES) {
  int x0 = 0;
  for (; x0 + 4 <= width; x0 += 4)
    pixels(rows, value_at + (size_t)x0 * 16, gate_at + (size_t)x0 * 16, w_value, w_gate, channels, bias, hidden,
           out_row + (size_t)x0 * hidden, 4, K, LANES);
  if (x0 < width)
    pixels(rows, value_at + (size_t)x0 * 16, gate_at + (size_t)x0 * 16, w_value, w_gate, channels, bias, hidden,
           out_row + (size_t)x0 * hidden, width - x0, K, LANES);
}

/* SiLU of one input row's block into its buffer slot (vectors whole vectors, the last one
 * last_lanes wide), prefetching the row below. */
static inline __attribute__((always_inline)) void fill_row(const float *src, float *dst, int width, int channels,
                                                            int hidden, int pitch, int vectors, int last_lanes,
                                                            int ahead) {
  const int whole = last_lanes == 16 ? vectors : vectors - 1;
  for (int x = 0; x < width; x++) {
    const float *pixel = src + (size_t)x * channels;
    for (int v = 0; v < vectors; v++) {
      __builtin_prefetch(pixel + ahead + 16 * v);
      __builtin_prefetch(pixel + ahead + hidden + 16 * v);
    }
    for (int v = 0; v < whole; v++) {
      const v16f value = load16f(pixel + 16 * v), gate = load16f(pixel + hidden + 16 * v);
      store16f(dst + ((size_t)v * pitch + x) * 16, value * logistic16(value));
      store16f(dst + ((size_t)(vectors + v) * pitch + x) * 16, gate * logistic16(gate));
    }
    if (whole < vectors) {
      const int v = whole;
      const v16f value = load_lanes(pixel + 16 * v, 8), gate = load_lanes(pixel + hidden + 16 * v, 8);
      store16f(dst + ((size_t)v * pitch + x) * 16, value * logistic16(value));
      store16f(dst + ((size_t)(vectors + v) * pitch + x) * 16, gate * logistic16(gate));
    }
  }
}

/* One unit, kernel size K (a constant where inlined for 3). */
static inline __attribute__((always_inline)) void unit(const struct gated *g, float *buf, int b, int block,
                                                        const int K) {
  const int pad = K / 2, hidden = g->hidden, channels = 2 * hidden;
  const int height = g->height, width = g->width, pitch = g->pitch;
  const int c0 = block * BLOCK, block_channels = hidden - c0 < BLOCK ? hidden - c0 : BLOCK;
  const int vectors = (block_channels + 15) / 16, last_lanes = block_channels % 16 ? 8 : 16;
  const size_t row_floats = (size_t)2 * vectors * pitch * 16; /* values' vectors, then the gates' */
  const float *zero = buf + (size_t)K * 2 * VECTORS * pitch * 16; /* a row of zeros past the K slots */
  const float *image = g->h + (size_t)b * height * width * channels;
  float *out_image = g->out + (size_t)b * height * width * hidden;

  /* the slots' padding columns (left, right and the spare ones read past the row) stay zero */
  for (int slot = 0; slot < K; slot++)
    for (int v = 0; v < 2 * vectors; v++) {
      float *row = buf + slot * row_floats + (size_t)v * pitch * 16;
      memset(row, 0, sizeof(float) * 16 * pad);
      memset(row + (size_t)(pad + width) * 16, 0, sizeof(float) * 16 * (pitch - pad - width));
    }

  for (int iy = -pad; iy < height; iy++) {
    const int fill = iy + pad; /* the input row the output row iy needs last */
    if (fill < height)
      /* The block's channels of a pixel are a few cache lines a page or more apart from the
       * next pixel's, a pattern the hardware prefetchers miss: ask for the next row's now. */
      fill_row(image + (size_t)fill * width * channels + c0, buf + (size_t)(fill % K) * row_floats + (size_t)pad * 16,
               width, channels, hidden, pitch, vectors, last_lanes, fill + 1 < height ? width * channels : 0);
    if (iy < 0) continue;
    const float *rows[K];
    for (int dy = 0; dy < K; dy++) {
      const int y = iy - pad + dy;
      rows[dy] = y < 0 || y >= height ? zero : buf + (size_t)(y % K) * row_floats;
    }
    float *out_row = out_image + (size_t)iy * width * hidden + c0;
    const int whole = last_lanes == 16 ? vectors : vectors - 1;
    for (int v = 0; v < vectors; v++) {
      const float *w_value = g->taps + c0 + 16 * v, *w_gate = w_value + hidden;
      const float *bias = g->bias ? g->bias + c0 + 16 * v : NULL;
      const size_t value_at = (size_t)v * pitch * 16, gate_at = (size_t)(vectors + v) * pitch * 16;
      if (v < whole)
        vector_row(rows, value_at, gate_at, w_value, w_gate, channels, bias, hidden, out_row + 16 * v, width, K, 16);
      else
        vector_row(rows, value_at, gate_at, w_value, w_gate, channels, bias, hidden, out_row + 16 * v, width, K, 8);
    }
  }
}

CLONES16 static void units(const struct gated *g, float *buf, long first, long last) {
  for (long u = first; u < last; u++) {
    const int b = (int)(u / g->blocks), block = (int)(u % g->blocks);
    if (g->k == 3)
      unit(g, buf, b, block, 3);
    else
      unit(g, buf, b, block, g->k);
  }
}

static void gated_part(void *arg, int part, int parts) {
  const struct gated *g = arg;
  const long total = (long)g->batch * g->blocks;
  units(g, g->scratch + (size_t)part * g->part_floats, total * part / parts, total * (part + 1) / parts);
}

/* Below this many input values one thread does it (waking the others costs more). */
#define PARALLEL_MIN_VALUES (1L << 15)

/* The row buffers of the last call, kept for the next (the C library may map a fresh allocation
 * of this size anew, its pages faulted in again on each call). A call takes it or, where
 * another call holds it or it is too small, allocates its own; it hands back the larger. */
struct scratch {
  float *floats;
  size_t size;
};
static struct scratch *kept;

static struct scratch *take_scratch(size_t size) {
  struct scratch *s = __atomic_exchange_n(&kept, NULL, __ATOMIC_ACQ_REL);
  if (s != NULL && s->size >= size) return s;
  if (s != NULL) {
    free(s->floats);
    free(s);
  }
  s = malloc(sizeof *s);
  if (s == NULL) return NULL;
  s->floats = aligned_alloc(64, size * sizeof(float));
  s->size = size;
  if (s->floats == NULL) {
    free(s);
    return NULL;
  }
  return s;
}

static void keep_scratch(struct scratch *s) {
  struct scratch *other = __atomic_exchange_n(&kept, s, __ATOMIC_ACQ_REL);
  if (other != NULL && other->size > s->size) {
    /* the larger one stays kept */
    struct scratch *back = __atomic_exchange_n(&kept, other, __ATOMIC_ACQ_REL);
    other = back;
  }
  if (other != NULL) {
    free(other->floats);
    free(other);
  }
}

/* Returns 0; -1 for a shape it does not take (channels not a multiple of 8, an even kernel), -2
 * when its buffers cannot be allocated. */
int mobileo_gated_depthwise(const float *h, int batch, int height, int width, int hidden, const float *taps, int k,
                            const float *bias, float *out) {
  if (hidden % 8 || hidden < 8 || k < 1 || k % 2 == 0 || batch < 1 || height < 1 || width < 1) return -1;
  struct gated g = {h, taps, bias, out, NULL, 0, batch, height, width, hidden, k, 0, 0};
  g.pitch = width + 2 * (k / 2) + 3;
  g.blocks = (hidden + BLOCK - 1) / BLOCK;
  /* k row slots and a zero row, each 2 * BLOCK channels; a whole number of cache lines */
  g.part_floats = (size_t)(k + 1) * 2 * BLOCK * g.pitch;
  const long units_total = (long)batch * g.blocks;
  int parts = mobileo_pool_threads(0);
  if (units_total < parts) parts = (int)units_total;
  if ((long)batch * height * width * 2 * hidden < PARALLEL_MIN_VALUES) parts = 1;
  struct scratch *scratch = take_scratch(g.part_floats * parts);
  if (scratch == NULL) return -2;
  g.scratch = scratch->floats;
  /* the zero rows (past each part's slots) */
  for (int part = 0; part < parts; part++)
    memset(g.scratch + part * g.part_floats + (size_t)k * 2 * BLOCK * g.pitch, 0,
           sizeof(float) * 2 * BLOCK * g.pitch);
  if (mobileo_pool_run(gated_part, &g, parts, 1) != 0) gated_part(&g, 0, 1);
  keep_scratch(scratch);
  return 0;
}
