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
 * pixel sums all k*k taps without a bounds check.
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

#define LOG2E 1.4426950408889634
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define ABS_MASK 0x7FFFFFFF
#define INF_BITS 0x7F800000
#define BOUND_BITS 0x42B00000 /* 88.0f: exp(-88) is below FLT_MIN, 2^n flushes to 0 from there */

/* Value channels per unit (and as many gate channels): its row buffer stays in L2. */
#define BLOCK 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX-512VL gives the 8-lane code 32 registers (the taps of both halves stay in them). */
#define GATED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GATED_CLONES
#endif

/* sigmoid(x), as activations._logistic_parts + _logistic. */
static inline __attribute__((always_inline)) v8f logistic8(v8f x) {
  const v8i bits = (v8i)x;
  const v8i magnitude = bits & ABS_MASK;
  const v8i over = magnitude - BOUND_BITS;
  const v8i clamped = magnitude - (over & ~(over >> 31));
  const v8i nan = (INF_BITS - magnitude) >> 31;
  const v8f a = (v8f)((clamped & ~nan) | (magnitude & nan));
  /* exp(-a) = 2^n exp(r) */
  const v8i scale_bits = __builtin_convertvector(a * (float)(-LOG2E) + 127.5f, v8i) << 23;
  const v8f n = __builtin_convertvector(scale_bits >> 23, v8f) - 127.0f;
  const v8f r = (-a - n * LN2_HI) - n * LN2_LO;
  const v8f r2 = r * r;
  const v8f even = 1.0f + r2 * 0.1f;
  const v8f odd = r * (0.5f + r2 * (float)(1.0 / 120.0));
  const v8f num = even + odd, den = even - odd;
  const v8f tail = (v8f)scale_bits * num;
  const v8f positive = 1.0f + __builtin_convertvector(bits >> 31, v8f);
  return (positive * den + (1.0f - positive) * tail) / (den + tail);
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
                                                          const int K) {
  v8f value[4], gate[4];
  {
    const v8f wv = load8f(w_value), wg = load8f(w_gate);
    for (int i = 0; i < 4; i++) {
      value[i] = load8f(rows[0] + value_at + 8 * i) * wv;
      gate[i] = load8f(rows[0] + gate_at + 8 * i) * wg;
    }
  }
#pragma GCC unroll 49
  for (int tap = 1; tap < K * K; tap++) {
    const int dy = tap / K, dx = tap % K;
    const v8f wv = load8f(w_value + (size_t)tap * channels), wg = load8f(w_gate + (size_t)tap * channels);
    const float *in_value = rows[dy] + value_at + (size_t)dx * 8, *in_gate = rows[dy] + gate_at + (size_t)dx * 8;
    for (int i = 0; i < 4; i++) {
      value[i] = value[i] + load8f(in_value + 8 * i) * wv;
      gate[i] = gate[i] + load8f(in_gate + 8 * i) * wg;
    }
  }
  if (bias) {
    const v8f bv = load8f(bias), bg = load8f(bias + hidden);
    for (int i = 0; i < 4; i++) {
      value[i] = value[i] + bv;
      gate[i] = gate[i] + bg;
    }
  }
  for (int i = 0; i < 4; i++)
    if (i < n) store8f(out + (size_t)i * hidden, value[i] * (gate[i] * logistic8(gate[i])));
}

/* One unit, kernel size K (a constant where inlined for 3). */
static inline __attribute__((always_inline)) void unit(const struct gated *g, float *buf, int b, int block,
                                                        const int K) {
  const int pad = K / 2, hidden = g->hidden, channels = 2 * hidden;
  const int height = g->height, width = g->width, pitch = g->pitch;
  const int c0 = block * BLOCK, vectors = (hidden - c0 < BLOCK ? hidden - c0 : BLOCK) / 8;
  const size_t row_floats = (size_t)2 * vectors * pitch * 8; /* values' vectors, then the gates' */
  const float *zero = buf + (size_t)K * 2 * (BLOCK / 8) * pitch * 8; /* a row of zeros past the K slots */
  const float *image = g->h + (size_t)b * height * width * channels;
  float *out_image = g->out + (size_t)b * height * width * hidden;

  /* the slots' padding columns (left, right and the spare ones read past the row) stay zero */
  for (int slot = 0; slot < K; slot++)
    for (int v = 0; v < 2 * vectors; v++) {
      float *row = buf + slot * row_floats + (size_t)v * pitch * 8;
      memset(row, 0, sizeof(float) * 8 * pad);
      memset(row + (size_t)(pad + width) * 8, 0, sizeof(float) * 8 * (pitch - pad - width));
    }

  for (int iy = -pad; iy < height; iy++) {
    const int fill = iy + pad; /* the input row the output row iy needs last */
    if (fill < height) {
      const float *src = image + (size_t)fill * width * channels;
      float *dst = buf + (size_t)(fill % K) * row_floats + (size_t)pad * 8;
      /* The block's channels of a pixel are a few cache lines a page or more apart from the
       * next pixel's, a pattern the hardware prefetchers miss: ask for the next row's now. */
      const int ahead = fill + 1 < height ? width * channels : 0;
      for (int x = 0; x < width; x++) {
        const float *pixel = src + (size_t)x * channels + c0;
        for (int v = 0; v < vectors; v++) {
          __builtin_prefetch(pixel + ahead + 8 * v);
          __builtin_prefetch(pixel + ahead + hidden + 8 * v);
          const v8f value = load8f(pixel + 8 * v), gate = load8f(pixel + hidden + 8 * v);
          store8f(dst + ((size_t)v * pitch + x) * 8, value * logistic8(value));
          store8f(dst + ((size_t)(vectors + v) * pitch + x) * 8, gate * logistic8(gate));
        }
      }
    }
    if (iy < 0) continue;
    const float *rows[K];
    for (int dy = 0; dy < K; dy++) {
      const int y = iy - pad + dy;
      rows[dy] = y < 0 || y >= height ? zero : buf + (size_t)(y % K) * row_floats;
    }
    float *out_row = out_image + (size_t)iy * width * hidden + c0;
    for (int v = 0; v < vectors; v++) {
      const float *w_value = g->taps + c0 + 8 * v, *w_gate = w_value + hidden;
      const size_t value_at = (size_t)v * pitch * 8, gate_at = (size_t)(vectors + v) * pitch * 8;
      for (int x0 = 0; x0 < width; x0 += 4)
        pixels(rows, value_at + (size_t)x0 * 8, gate_at + (size_t)x0 * 8, w_value, w_gate, channels,
               g->bias ? g->bias + c0 + 8 * v : NULL, hidden, out_row + (size_t)x0 * hidden + 8 * v,
               width - x0 < 4 ? width - x0 : 4, K);
    }
  }
}

GATED_CLONES static void units(const struct gated *g, float *buf, long first, long last) {
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

/* Returns 0; -1 for a shape it does not take (channels not a multiple of 8, an even kernel), -2
 * when its buffers cannot be allocated. */
int mobileo_gated_depthwise(const float *h, int batch, int height, int width, int hidden, const float *taps, int k,
                            const float *bias, float *out) {
  if (hidden % 8 || hidden < 8 || k < 1 || k % 2 == 0 || batch < 1 || height < 1 || width < 1) return -1;
  struct gated g = {h, taps, bias, out, NULL, 0, batch, height, width, hidden, k, 0, 0};
  g.pitch = width + 2 * (k / 2) + 3;
  g.blocks = (hidden + BLOCK - 1) / BLOCK;
  /* k row slots and a zero row, each 2 * BLOCK channels; a whole number of cache lines */
  g.part_floats = ((size_t)(k + 1) * 2 * BLOCK * g.pitch + 15) / 16 * 16;
  const long units_total = (long)batch * g.blocks;
  int parts = mobileo_pool_threads(0);
  if (units_total < parts) parts = (int)units_total;
  if ((long)batch * height * width * 2 * hidden < PARALLEL_MIN_VALUES) parts = 1;
  g.scratch = aligned_alloc(64, g.part_floats * parts * sizeof(float));
  if (g.scratch == NULL) return -2;
  /* the zero rows (past each part's slots) */
  for (int part = 0; part < parts; part++)
    memset(g.scratch + part * g.part_floats + (size_t)k * 2 * BLOCK * g.pitch, 0,
           sizeof(float) * 2 * BLOCK * g.pitch);
  if (mobileo_pool_run(gated_part, &g, parts, 1) != 0) gated_part(&g, 0, 1);
  free(g.scratch);
  return 0;
}
