/* Depthwise (groups = channels) 2-D convolution, NHWC float32, on every core.
 *
 * MLX's CPU backend has no fast grouped conv; its twin here (kernels/depthwise.py, a
 * shift-and-add of compiled MLX kernels) runs on one thread per stream at ~1 ns a
 * multiply-add. This loops over output rows (split between the pool's threads), four
 * output pixels at a time, with the channels in 8-lane vectors: every weight vector is
 * loaded once per tap and used for four pixels.
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

MULTIVERSION static void rows(const struct conv *g, long first, long last) {
  for (long r = first; r < last; r++) {
    const int b = (int)(r / g->out_h), oy = (int)(r % g->out_h);
    const float *image = g->x + (size_t)b * g->height * g->width * g->channels;
    float *row_out = g->out + (size_t)r * g->out_w * g->channels;
    for (int ox = 0; ox < g->out_w; ox += 4) {
      const int n = g->out_w - ox < 4 ? g->out_w - ox : 4;
      for (int c = 0; c < g->channels; c += 8) pixels(g, image, oy, ox, n, c, row_out);
    }
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
