/* Depthwise (groups = channels) 2-D convolution, NHWC float32, on every core.
 *
 * MLX's CPU backend has no fast grouped conv; its twin here (kernels/depthwise.py, a
 * shift-and-add of compiled MLX kernels) runs on one thread per stream at ~1 ns a
 * multiply-add. This loops over output rows (split between the pool's threads), with the
 * channels in 8-lane vectors. Inside the row, where every tap of eight consecutive output
 * pixels reads inside the input, the eight accumulators stay in registers and no tap is
 * checked; near the left and right borders (and rows narrower than eight pixels inside),
 * four pixels at a time with the taps outside the input skipped. Every output sums the same
 * terms in the same order either way (the bias, then the taps row by row, each added as
 * acc + w * x, rounded twice: the library is built without fused multiply-adds), so the
 * split between the two paths never changes a bit.
 *
 * out[b, oy, ox, c] = bias[c] + sum_{dy, dx} x[b, oy*sy - py + dy, ox*sx - px + dx, c] * w[dy, dx, c]
 * (taps outside the input read zero). Weights come as [kh, kw, C] (the caller transposes
 * MLX's [C, kh, kw, 1]). C must be a multiple of 8.
 */
#include "cpu_kernels.h"
#include "pool.h"
#include "vec8.h"

struct conv {
  const float *x, *w, *bias;
  float *out;
  int batch, height, width, channels;
  int kh, kw, sy, sx, py, px;
  int out_h, out_w;
};

/* Output pixels [ox0, ox0 + n) of one output row, n <= 4, channel vector at c. */
static inline __attribute__((always_inline)) void pixels(const struct conv *g, const float *image, int oy, int ox0,
                                                          int n, int c, float *row_out) {
  v8f acc[4];
  const v8f b = g->bias ? load8f(g->bias + c) : (v8f){0};
  for (int i = 0; i < 4; i++) acc[i] = b;
  for (int dy = 0; dy < g->kh; dy++) {
    const int iy = oy * g->sy - g->py + dy;
    if (iy < 0 || iy >= g->height) continue;
    const float *in_row = image + (size_t)iy * g->width * g->channels;
    for (int dx = 0; dx < g->kw; dx++) {
      const v8f w = load8f(g->w + ((size_t)dy * g->kw + dx) * g->channels + c);
      for (int i = 0; i < n; i++) {
        const int ix = (ox0 + i) * g->sx - g->px + dx;
        if (ix >= 0 && ix < g->width) acc[i] += w * load8f(in_row + (size_t)ix * g->channels + c);
      }
    }
  }
  for (int i = 0; i < n; i++) store8f(row_out + (size_t)(ox0 + i) * g->channels + c, acc[i]);
}

/* Output pixels [ox0, ox0 + 8) of one output row, channel vector at c, where every tap column is
 * inside the input: the same sums as pixels(), with the accumulators in registers. */
#define INTERIOR 8
static inline __attribute__((always_inline)) void interior_pixels(const struct conv *g, const float *image, int oy,
                                                                   int ox0, int c, float *row_out) {
  v8f acc[INTERIOR];
  const v8f b = g->bias ? load8f(g->bias + c) : (v8f){0};
  for (int i = 0; i < INTERIOR; i++) acc[i] = b;
  const size_t channels = (size_t)g->channels, step = (size_t)g->sx * channels;
  for (int dy = 0; dy < g->kh; dy++) {
    const int iy = oy * g->sy - g->py + dy;
    if (iy < 0 || iy >= g->height) continue;
    const float *in = image + ((size_t)iy * g->width + (size_t)(ox0 * g->sx - g->px)) * channels + c;
    const float *w_row = g->w + (size_t)dy * g->kw * channels + c;
    for (int dx = 0; dx < g->kw; dx++) {
      const v8f w = load8f(w_row + (size_t)dx * channels);
      const float *p = in + (size_t)dx * channels;
#pragma GCC unroll 8
      for (int i = 0; i < INTERIOR; i++) acc[i] += w * load8f(p + i * step);
    }
  }
  for (int i = 0; i < INTERIOR; i++) store8f(row_out + (size_t)(ox0 + i) * channels + c, acc[i]);
}

/* interior_pixels() for a kernel width K and column stride SX known when compiling: each input
 * column of the row is loaded once and used by every output pixel whose tap reads it (pixel i,
 * tap dx reads column i * SX + dx), the K tap weights of the row in registers. Columns are
 * visited left to right, so each pixel still adds its taps in the order dx = 0, 1, ... */
static inline __attribute__((always_inline)) void interior_fixed(const struct conv *g, const float *image, int oy,
                                                                  int ox0, int c, float *row_out, const int K,
                                                                  const int SX) {
  v8f acc[INTERIOR];
  const v8f b = g->bias ? load8f(g->bias + c) : (v8f){0};
  for (int i = 0; i < INTERIOR; i++) acc[i] = b;
  const size_t channels = (size_t)g->channels;
  for (int dy = 0; dy < g->kh; dy++) {
    const int iy = oy * g->sy - g->py + dy;
    if (iy < 0 || iy >= g->height) continue;
    const float *in = image + ((size_t)iy * g->width + (size_t)(ox0 * SX - g->px)) * channels + c;
    const float *w_row = g->w + (size_t)dy * K * channels + c;
    v8f w[K];
#pragma GCC unroll 8
    for (int dx = 0; dx < K; dx++) w[dx] = load8f(w_row + (size_t)dx * channels);
#pragma GCC unroll 32
    for (int j = 0; j < (INTERIOR - 1) * SX + K; j++) {
      const v8f column = load8f(in + (size_t)j * channels);
#pragma GCC unroll 8
      for (int i = 0; i < INTERIOR; i++) {
        const int dx = j - i * SX;
        if (dx >= 0 && dx < K) acc[i] += w[dx] * column;
      }
    }
  }
  for (int i = 0; i < INTERIOR; i++) store8f(row_out + (size_t)(ox0 + i) * channels + c, acc[i]);
}

/* The interior blocks of one output row, the models' kernel shapes compiled for their size (FastViT's
 * 3x3 / 7x7 and its stride-2 downsamplers and stem, the DC-AE's 5x5). */
static inline __attribute__((always_inline)) void interior_run(const struct conv *g, const float *image, int oy,
                                                                int from, int to, float *row_out) {
  const int shape = g->kw * 4 + g->sx;
#define FIXED(K, SX)                                                                      \
  case (K) * 4 + (SX):                                                                    \
    for (int ox = from; ox < to; ox += INTERIOR)                                          \
      for (int c = 0; c < g->channels; c += 8) interior_fixed(g, image, oy, ox, c, row_out, K, SX); \
    return;
  switch (g->kw <= 7 && g->sx <= 2 ? shape : 0) {
    FIXED(3, 1)
    FIXED(3, 2)
    FIXED(5, 1)
    FIXED(7, 1)
    FIXED(7, 2)
    default:
      for (int ox = from; ox < to; ox += INTERIOR)
        for (int c = 0; c < g->channels; c += 8) interior_pixels(g, image, oy, ox, c, row_out);
  }
#undef FIXED
}

/* Output pixels [from, to) of one row through pixels(), four at a time. */
static inline __attribute__((always_inline)) void edge_run(const struct conv *g, const float *image, int oy, int from,
                                                            int to, float *row_out) {
  for (int ox = from; ox < to; ox += 4) {
    const int n = to - ox < 4 ? to - ox : 4;
    for (int c = 0; c < g->channels; c += 8) pixels(g, image, oy, ox, n, c, row_out);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEPTHWISE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DEPTHWISE_CLONES
#endif

DEPTHWISE_CLONES static void rows(const struct conv *g, long first, long last) {
  /* Output columns [inner_lo, inner_hi) read only inside the input at every tap. */
  const int inner_lo = (g->px + g->sx - 1) / g->sx;
  const int last_inside = g->width - g->kw + g->px; /* the largest ox * sx whose taps stay inside */
  int inner_hi = last_inside < 0 ? 0 : last_inside / g->sx + 1;
  if (inner_hi > g->out_w) inner_hi = g->out_w;
  int blocks_end = inner_lo;
  if (inner_hi > inner_lo) blocks_end = inner_lo + (inner_hi - inner_lo) / INTERIOR * INTERIOR;
  for (long r = first; r < last; r++) {
    const int b = (int)(r / g->out_h), oy = (int)(r % g->out_h);
    const float *image = g->x + (size_t)b * g->height * g->width * g->channels;
    float *row_out = g->out + (size_t)r * g->out_w * g->channels;
    if (blocks_end <= inner_lo) {
      edge_run(g, image, oy, 0, g->out_w, row_out);
      continue;
    }
    edge_run(g, image, oy, 0, inner_lo, row_out);
    interior_run(g, image, oy, inner_lo, blocks_end, row_out);
    edge_run(g, image, oy, blocks_end, g->out_w, row_out);
  }
}

static void conv_part(void *arg, int part, int parts) {
  const struct conv *g = arg;
  const long total = (long)g->batch * g->out_h;
  rows(g, total * part / parts, total * (part + 1) / parts);
}

/* Returns 0, or -1 for a shape it does not take (channels not a multiple of 8). */
int mobileo_depthwise_conv2d(const float *x, int batch, int height, int width, int channels, const float *w,
                             int kh, int kw, const float *bias, int sy, int sx, int py, int px, float *out,
                             int out_h, int out_w) {
  if (channels % 8 || batch < 1 || out_h < 1 || out_w < 1 || sy < 1 || sx < 1) return -1;
  struct conv g = {x, w, bias, out, batch, height, width, channels, kh, kw, sy, sx, py, px, out_h, out_w};
  int parts = mobileo_pool_threads(0);
  if ((long)batch * out_h < parts) parts = batch * out_h;
  if (mobileo_pool_run(conv_part, &g, parts, 1) != 0) conv_part(&g, 0, 1);
  return 0;
}
