/* The entry points of the cpu_kernels library (quantized_gemv.c, dequantize.c, bf16_gemm.c, gelu.c,
 * depthwise.c, gated_depthwise.c, silu.c, norms.c, attention.c), for the C++ graph nodes in primitives.cpp.
 * All arrays are float32 (the GEMV's weights uint32), contiguous (the attention kernels' inputs: strided
 * head views, mobileo_heads). */
#ifndef MOBILEO_CPU_KERNELS_H
#define MOBILEO_CPU_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* x [rows, k] times the affine-quantized W [n, k] transposed into out [rows, n]; -1: shape not taken. */
int mobileo_quantized_gemv(const float *x, int rows, int k, const uint32_t *packed, const float *scales,
                           const float *biases, int n, int bits, int group, float *out);

/* out [n, k] = the affine-quantized W [n, k] (4 or 8 bits, MLX's packing) in float32; -1: not taken
 * (other bits, groups not a multiple of 8). */
int mobileo_dequantize(const uint32_t *packed, const float *scales, const float *biases, int n, int k, int bits,
                       int group, float *out);

/* out[i] = gelu(x[i]) (exact erf form; out may be x). Returns 0. */
int mobileo_gelu(const float *x, float *out, long count);

/* NHWC depthwise conv, taps [kh, kw, C], bias [C] or NULL; -1: channels not a multiple of 8. */
int mobileo_depthwise_conv2d(const float *x, int batch, int height, int width, int channels, const float *w,
                             int kh, int kw, const float *bias, int sy, int sx, int py, int px, float *out,
                             int out_h, int out_w);

int mobileo_bf16_gemm_supported(void);
long mobileo_bf16_products_done(void);
/* Products the AMX path computed (a subset of mobileo_bf16_products_done). */
long mobileo_bf16_amx_products_done(void);
/* Whether this CPU has AMX-BF16 and Linux grants the tile state (whatever was chosen). */
int mobileo_bf16_amx_available(void);
/* The GEMM's kernel, chosen once per process (MOBILEO_MLX_BF16_GEMM=auto|amx|avx512):
 * "amx", "avx512-bf16", or "none" (no AVX512-BF16). */
const char *mobileo_bf16_gemm_kernel(void);
/* Frees the GEMM's packing buffers (kept between products, up to 256 MB). */
void mobileo_bf16_release(void);

/* c [m, n] = op(a) op(b) + beta c (+ bias) with bfloat16 operands and float32 sums (row-major; op
 * transposes when trans_* is set; c is not read when beta is 0; bias: a row [n] added after the
 * sums as c is stored, or NULL) by AMX tiles or the AVX512-BF16 register tile
 * (mobileo_bf16_gemm_kernel). Takes every size and waits its turn for the pool; -1: no
 * AVX512-BF16, or no memory. */
int mobileo_bf16_gemm(int trans_a, int trans_b, int m, int n, int k, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc, const float *bias);

/* What a bf16 GEMM does to its rows besides the product (mobileo_bf16_gemm_q8, mobileo_bf16_conv), each
 * part optional (NULL / 0: not done), with the roundings of the separate operations it replaces:
 *   A's rows first normalised: LayerNorm(row) * (1 + scale) + shift (no affine), shift and scale
 *     [M / norm_rows][K]: mobileo_modulated_layer_norm's bits (a plain, row-contiguous A only);
 *   C's values after the bias: SiLU (silu; mobileo_silu's bits), then residual + gate * value
 *     (residual rows as C's [M, ldc]; gate [M / gate_rows][N], or NULL for residual + value);
 *   C's rows, once whole: [row_residual +] RMSNorm(row) * row_weight + row_bias
 *     (mobileo_rms_norm_residual's bits; row_residual as C's rows, or NULL), each while it is in cache;
 *   a conv's shortcut, added to the sums first: (shortcut[row][first + step * col] [+ shortcut_bias[col]])
 *     + value, shortcut's rows `shortcut_channels` floats apart, one per row of the product (a pixel of
 *     the conv's input): the DC-AE upsampler's pixel_shuffle(repeat_interleave(x)) read from x itself. */
struct mobileo_gemm_extras {
  const float *norm_shift, *norm_scale;
  float norm_eps;
  int norm_rows;
  int silu;
  const float *residual, *gate;
  int gate_rows;
  const float *row_weight, *row_bias, *row_residual;
  float row_eps;
  const float *shortcut, *shortcut_bias;
  int shortcut_channels, shortcut_step, shortcut_first;
};

/* c [m, n] = op(a) W + bias for W [k, n] = values * scales + biases, K-major 8-bit affine:
 * values [k][n] uint8, scales and biases [k / group_size][n] (row-major, group_size dividing k),
 * bias a row [n] or NULL. Each B panel is dequantized in float32 and rounded to bfloat16 as it
 * is packed (no float32 W), the bias added as C is stored: the bits mobileo_bf16_gemm gives on
 * the dequantized W, plus the bias added after; extras (or NULL) as the struct says (not with trans_a).
 * -1: no AVX512-BF16, a bad group size, extras it does not take, or no memory. */
int mobileo_bf16_gemm_q8(int trans_a, int m, int n, int k, const float *a, int lda, const uint8_t *values,
                         const float *scales, const float *biases, int group_size, const float *bias, float *c,
                         int ldc, const struct mobileo_gemm_extras *extras);

/* c [m, n] = a W^T + bias for W [n, k] in MLX's 4-bit affine layout (packed [n][k / 8] words, scales and
 * biases [n][k / group_size]; group_size a multiple of 32 dividing k), a row-major with row stride lda: each
 * B panel dequantized (value * scale, then + bias) and rounded to bfloat16 as it is packed, so the bits of
 * mobileo_bf16_gemm on mx.dequantize's W^T; the bias added in the store. -1: no AVX512-BF16, a group size it
 * does not take, or no memory. */
int mobileo_bf16_gemm_q4(int m, int n, int k, const float *a, int lda, const uint32_t *packed, const float *scales,
                         const float *biases, int group_size, const float *bias, float *c, int ldc);

/* out [B, H, W, O] = conv(x, weight) [+ out] (+ bias) with bfloat16 operands and float32 sums: a
 * stride-1 conv whose output has the input's size, x [B, H, W, C] row-major, weight [O, kh, kw, C]
 * (MLX's layout), output pixel (y, x) reading input rows y - pad_top .. and columns x - pad_left ..,
 * zeros outside the map (no padded copy: the GEMM's A is packed from the windows of x, K = kh kw C
 * summed in the tiles, out written once). accumulate: out holds an addend on entry (read in the
 * store, as mobileo_bf16_gemm's beta 1); bias [O] or NULL, added after the sums. out_pixel_stride 0:
 * out is [B, H, W, O] contiguous; else the O outputs of pixel (y, x) of image b are at
 * out + (b H + y) out_line_stride + x out_pixel_stride (floats): the sub-pixel upsampler writes each
 * parity straight into the interleaved map. extras (or NULL): silu and the rows' RMSNorm (a contiguous out),
 * the shortcut (any out).
 * Same kernels and threads as mobileo_bf16_gemm; -1: no AVX512-BF16, a bad shape, extras it does not
 * take, or no memory. */
int mobileo_bf16_conv(const float *x, int batch, int height, int width, int channels, const float *weight, int kh,
                      int kw, int out_channels, int pad_top, int pad_left, const float *bias, int accumulate,
                      float *out, long out_line_stride, long out_pixel_stride,
                      const struct mobileo_gemm_extras *extras);

/* GLUMBConv's middle: out [B, H, W, C] = D[..., :C] * silu(D[..., C:]), D = depthwise conv of silu(h)
 * (h [B, H, W, 2C]; taps [k, k, 2C], k odd, padding k / 2) + bias [2C] (or NULL); -1: shape not
 * taken (C not a multiple of 8, k even), -2: no memory. */
int mobileo_gated_depthwise(const float *h, int batch, int height, int width, int hidden, const float *taps, int k,
                            const float *bias, float *out);

/* A grouped 1x1 conv without bias: out [pixels, groups size] = per group g, x[:, g size ...] @ W_g^T with
 * w [groups size, size] (row g size + o: output o's weights), sums over i in order; size a multiple of
 * 16, up to 64. -1: a shape it does not take, -2: no memory. */
int mobileo_grouped_pointwise(const float *x, long pixels, int groups, int size, const float *w, float *out);

/* out[i] = silu(x[i]) (out may be x); out[i] = a[i] * silu(g[i]) (out may be a or g): the
 * algorithm and the bits of backends/cpu/activations.py's silu / glu_silu. Return 0. */
int mobileo_silu(const float *x, float *out, long count);
int mobileo_glu_silu(const float *a, const float *g, float *out, long count);

/* The rows of an array whose last axis is contiguous: row r (in row-major order over the
 * leading axes shape[0..dims)) starts at sum_i index_i * strides[i] floats. */
#define MOBILEO_MAX_ROW_DIMS 8
struct mobileo_rows {
  int dims;
  long shape[MOBILEO_MAX_ROW_DIMS];
  long strides[MOBILEO_MAX_ROW_DIMS];
};

/* out [rows, dim] = [residual +] (y * (1 / sqrt(sum(y^2) * (1 / dim) + eps)) * weight + bias) per
 * row, each sum in index order (MLX's CPU order); residual NULL or of y's shape; out may be y
 * when y is row-contiguous. -1: a layout it does not take. */
int mobileo_rms_norm_residual(const float *y, const struct mobileo_rows *y_rows, const float *residual,
                              const struct mobileo_rows *residual_rows, const float *weight, const float *bias,
                              float eps, long rows, int dim, float *out);

/* x [batch, tokens, dim] -> out = LayerNorm(x) (no affine, in-order sums) * (1 + scale) + shift,
 * shift and scale [batch, dim]. Returns 0 (-1: an empty dim or no tokens). */
int mobileo_modulated_layer_norm(const float *x, long batch, long tokens, int dim, const float *shift,
                                 const float *scale, float eps, float *out);

/* Rows [begin, end) of mobileo_rms_norm_residual for a row-contiguous y [rows, dim] (residual and out
 * likewise, out may be y), on the calling thread: the same bits. */
void mobileo_rms_norm_residual_rows(const float *y, const float *residual, const float *weight, const float *bias,
                                    float eps, int dim, long begin, long end, float *out);

/* Rows [begin, end) of mobileo_modulated_layer_norm's output (x [rows, dim] row-contiguous, shift and
 * scale [rows / tokens, dim]) into out [end - begin][dim], on the calling thread: the same bits. */
void mobileo_modulated_layer_norm_rows(const float *x, long tokens, int dim, const float *shift, const float *scale,
                                       float eps, long begin, long end, float *out);

/* out = x + gate * update for x, update [batch, tokens, dim], gate [batch, dim]; out may be x or
 * update. Returns 0 (-1: an empty dim or no tokens). */
int mobileo_gated_residual(const float *x, const float *gate, const float *update, long batch, long tokens, int dim,
                           float *out);

/* A [batch, heads, rows, d] float32 view read in place: element (b, h, r, i) at
 * data[b * batch + h * head + r * row + i] (strides in elements, unit stride along d). */
typedef struct {
  const float *data;
  int64_t batch, head, row;
} mobileo_heads;

/* Whether this CPU runs the attention kernels (AVX-512F); elsewhere they return -1. */
int mobileo_attention_supported(void);

/* out [B, N, heads, d_v] = softmax(scale q k^T + key_bias) v per (b, head): q [B, heads, N, d],
 * k [B, heads_kv, L, d], v [B, heads_kv, L, d_v] (query head h reads KV head h / (heads / heads_kv);
 * heads_kv divides heads), key_bias [B][L] (added to every query's scores) or NULL. causal: query
 * row i sees keys l <= i + L - N only (L >= N; the others' scores are -inf and not computed).
 * -1: no AVX-512, an empty size or sizes that do not fit, -2: no memory. */
int mobileo_softmax_attention(int batch, int heads, int heads_kv, int queries, int keys, int depth, int depth_v,
                              mobileo_heads q, mobileo_heads k, mobileo_heads v, const float *key_bias, int causal,
                              float scale, float *out);

/* out [B, N, heads, d_v] = relu(q) kv / (relu(q) . ksum + eps) per (b, head), kv = relu(k)^T v,
 * ksum = sum of relu(k) over the keys: q [B, heads, N, d], k [B, heads, M, d], v [B, heads, M, d_v].
 * -1: no AVX-512 or an empty size, -2: no memory. */
int mobileo_relu_linear_attention(int batch, int heads, int queries, int keys, int depth, int depth_v,
                                  mobileo_heads q, mobileo_heads k, mobileo_heads v, float eps, float *out);

#ifdef __cplusplus
}
#endif

#endif
