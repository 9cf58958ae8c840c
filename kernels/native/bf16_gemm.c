/* Single-precision GEMM computed with bfloat16 products (AVX512-BF16), float32 sums.
 *
 * C = alpha * A B + beta * C with A and B rounded to bfloat16 (round to nearest even)
 * as they are packed, and every product accumulated in float32 by VDPBF16PS: twice the
 * multiply-adds per instruction of an fp32 FMA. This is what "bfloat16 compute" means on
 * a GPU; here it serves MLX's CPU backend when the user asks for it, on CPUs that have the
 * instructions (Zen 4, Sapphire Rapids, Cooper Lake and later), as the bf16_matmul node of
 * MLX's graph (primitives.cpp).
 *
 * Blocking: A is packed whole, in tiles of MR rows ([K/2][MR] pairs of k); each thread
 * packs one NR-column panel of B at a time ([K/2][NR] pairs, in L2) and runs every A tile
 * against it with the full K in registers, so C is written once.
 *
 * AMX (Sapphire Rapids and later): the same B panels, zero-padded to whole 32-k chunks, are
 * exactly TDPBF16PS's B operand (16 k-pairs x 16 columns, a 128-byte stride); A is packed in
 * tiles of 16 rows, each 32-k chunk of a tile 1 KB contiguous ([K/32][16][16] pairs). A
 * 32 x 32 block of C is four 16 x 16 float32 tiles accumulated over the full K from two A
 * and two B tiles. Chosen once per process (choose_kernel below).
 *
 * Convs (mobileo_bf16_conv): the same product with A read from the windows of an NHWC map
 * (struct gemm's conv_x: each row gathered into a small buffer, zero padding included, then
 * packed as any A), so a kh x kw conv is one GEMM with K = kh kw C and no padded or im2col copy.
 */
#define _GNU_SOURCE
#include <stdint.h>

#include "cpu_kernels.h"


#if !defined(__x86_64__) || !defined(__GNUC__)
/* Other architectures: not available (the caller takes the twin). */
int mobileo_bf16_gemm_supported(void) { return 0; }
long mobileo_bf16_products_done(void) { return 0; }
long mobileo_bf16_amx_products_done(void) { return 0; }
int mobileo_bf16_amx_available(void) { return 0; }
const char *mobileo_bf16_gemm_kernel(void) { return "none"; }
void mobileo_bf16_release(void) {}
int mobileo_bf16_gemm(int trans_a, int trans_b, int m, int n, int k, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc, const float *bias) {
  (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)b, (void)ldb, (void)beta;
  (void)c, (void)ldc, (void)bias;
  return -1;
}
int mobileo_bf16_conv(const float *x, int batch, int height, int width, int channels, const float *weight, int kh,
                      int kw, int out_channels, int pad_top, int pad_left, const float *bias, int accumulate,
                      float *out, long out_line_stride, long out_pixel_stride,
                      const struct mobileo_gemm_extras *extras) {
  (void)out_line_stride, (void)out_pixel_stride, (void)extras;
  (void)x, (void)batch, (void)height, (void)width, (void)channels, (void)weight, (void)kh, (void)kw;
  (void)out_channels, (void)pad_top, (void)pad_left, (void)bias, (void)accumulate, (void)out;
  return -1;
}
int mobileo_bf16_gemm_q8(int trans_a, int m, int n, int k, const float *a, int lda, const uint8_t *values,
                         const float *scales, const float *biases, int group_size, const float *bias, float *c,
                         int ldc, const struct mobileo_gemm_extras *extras) {
  (void)trans_a, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)values, (void)scales, (void)biases;
  (void)group_size, (void)bias, (void)c, (void)ldc, (void)extras;
  return -1;
}
int mobileo_bf16_gemm_q4(int m, int n, int k, const float *a, int lda, const uint32_t *packed, const float *scales,
                         const float *biases, int group_size, const float *bias, float *c, int ldc) {
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)packed, (void)scales, (void)biases, (void)group_size;
  (void)bias, (void)c, (void)ldc;
  return -1;
}
#else
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "logistic16.h"
#include "pool.h"

#define MR 12
#define NR 32
#define PANEL_BLOCK 4 /* B panels held together (in L2) while the A tiles stream past */
/* AMX: as many panels as fit in AMX_BLOCK_BYTES, up to AMX_PANEL_BLOCK: its tiles consume A four
 * times as fast as the register tile, so A is streamed from memory once per more columns. */
#define AMX_BLOCK_BYTES ((size_t)1 << 20)
#define AMX_PANEL_BLOCK 16
#define CONV_ROWS_PER_PART 1024 /* see run_gemm */
#define AMX_L2_BYTES ((size_t)2 << 20)    /* see run_gemm */
#define AMX_GROUP_BYTES ((size_t)1 << 20) /* see run_gemm */
#define CONV_CHUNK_BYTES ((size_t)32 << 20) /* see mobileo_bf16_conv */
#define ROW_MAJOR 101
#define NO_TRANS 111

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* The AMX path needs a compiler that knows the tile instructions (GCC 11, clang 12). */
#if defined(__has_include)
#if __has_include(<amxbf16intrin.h>)
#define HAVE_AMX 1
#endif
#endif
#ifdef HAVE_AMX
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define AMX_ROWS 16    /* rows of an A tile and of a C tile */
#define AMX_PAIRS 16   /* k pairs of a 32-k chunk: one tile row of A, the rows of a B tile */

struct gemm {
  int m, n, k, k2;              /* k2: pairs of k (K rounded up to even, halved) */
  int b_rows;                   /* rows of a packed B panel: k2, or k2 up to whole AMX chunks */
  const float *a, *b;
  int lda, ldb, trans_a, trans_b;
  /* B as K-major 8-bit affine values instead (b unused): values [K][N] uint8, scales and
   * biases [K / q_group][N]; NULL for a float B. */
  const uint8_t *q_values;
  const float *q_scales, *q_biases;
  int q_group;
  /* Or B as W^T for MLX's 4-bit affine layout of W [N, K] (b unused): q4_packed [N][K / 8] words (value k of
   * row n in bits 4 (k % 8) of word k / 8), scales and biases [N][K / q_group] (q_scales, q_biases). */
  const uint32_t *q4_packed;
  /* A as the windows of a stride-1 conv whose output has the input's size (a unused, trans_a 0):
   * row m = (b H + y) W + x, column k = (i kw + j) C + c holds conv_x[b, y + i - pad_top,
   * x + j - pad_left, c], 0 outside the map (the zero padding, made as A is packed); NULL for a
   * plain A. Each row is gathered into a buffer of the part's (row_buffers) then packed as A's. */
  const float *conv_x;
  int conv_h, conv_w, conv_c, conv_kh, conv_kw, conv_pad_top, conv_pad_left;
  int conv_row0;                /* a conv's pixel of row 0 of this product (and of C): 0, or a chunk's first */
  float *row_buffers;           /* conv: K floats per part, normalised A: a tile's rows (row_stride apart) */
  size_t row_stride;
  /* A conv's C scattered instead of [M, ldc]: the row of pixel (b H + y, x) at
   * c + (b H + y) c_line_stride + x c_pixel_stride (the upsampler's parities, each written
   * straight into the interleaved map); 0: C as ldc says. Its stores go through the buffer. */
  long c_line_stride, c_pixel_stride;
  const float *bias;            /* a row [N] added to every row of C as it is stored, or NULL */
  struct mobileo_gemm_extras ex; /* A's rows normalised, C's values through SiLU / a gated residual (all 0: none) */
  float alpha, beta;
  float *c;
  int ldc;
  uint32_t *packed_a;           /* [tiles][k2][MR]; AMX: [tiles][b_rows / 16][16][16], or two tiles per part */
  uint32_t *panel_buffers;      /* panel_block [b_rows][NR] panels of B per part */
  int panel_block;              /* panels packed together: PANEL_BLOCK, or more with AMX */
  int panels;                   /* NR-column panels of B */
  int packed_parts;             /* parts done packing A (a barrier) */
  int pair_group;               /* AMX over rows: pairs of A tiles packed together (see run_gemm) */
};

static inline float get(const float *p, int ld, int trans, int row, int col) {
  return trans ? p[(size_t)col * ld + row] : p[(size_t)row * ld + col];
}

/* Round to nearest even, as VCVTNEPS2BF16 (NaNs stay NaNs). */
static inline uint16_t to_bf16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline uint32_t pair(float lo, float hi) { return (uint32_t)to_bf16(lo) | ((uint32_t)to_bf16(hi) << 16); }

/* Row `row` of a conv's A (struct gemm's conv_x) gathered into buffer [K]: per kernel row, the
 * taps inside the map are one contiguous span of pixels, the others zeros. */
static const float *conv_row(const struct gemm *g, int row, float *buffer) {
  row += g->conv_row0;
  const int w = g->conv_w, h = g->conv_h, c = g->conv_c, x = row % w, y = (row / w) % h, image = row / w / h;
  const int first_x = x - g->conv_pad_left;
  const int lo = first_x < 0 ? -first_x : 0, hi = first_x + g->conv_kw > w ? w - first_x : g->conv_kw;
  float *out = buffer;
  for (int i = 0; i < g->conv_kh; i++, out += (size_t)g->conv_kw * c) {
    const int source_y = y + i - g->conv_pad_top;
    if (source_y < 0 || source_y >= h || hi <= lo) {
      memset(out, 0, (size_t)g->conv_kw * c * sizeof(float));
      continue;
    }
    if (lo > 0) memset(out, 0, (size_t)lo * c * sizeof(float));
    memcpy(out + (size_t)lo * c, g->conv_x + (((size_t)image * h + source_y) * w + first_x + lo) * c,
           (size_t)(hi - lo) * c * sizeof(float));
    if (hi < g->conv_kw) memset(out + (size_t)hi * c, 0, (size_t)(g->conv_kw - hi) * c * sizeof(float));
  }
  return buffer;
}

/* Row `row` of a row-major A as K contiguous floats: in place, or a conv's gathered into buffer. */
static inline const float *a_row(const struct gemm *g, int row, float *buffer) {
  return g->conv_x != NULL ? conv_row(g, row, buffer) : g->a + (size_t)row * g->lda;
}

/* A normalised (struct gemm's ex.norm_*): rows [row0, row0 + count) (those before M) made in buffer,
 * K floats each; NULL for any other A (its rows are read by a_row). */
static const float *normalised_rows(const struct gemm *g, int row0, int count, float *buffer) {
  if (g->ex.norm_shift == NULL) return NULL;
  const int end = row0 + count < g->m ? row0 + count : g->m;
  if (row0 < end)
    mobileo_modulated_layer_norm_rows(g->a, g->ex.norm_rows, g->k, g->ex.norm_shift, g->ex.norm_scale, g->ex.norm_eps,
                                      row0, end, buffer);
  return buffer;
}

/* Where row `row` of C starts. */
static inline float *c_row(const struct gemm *g, int row) {
  row += g->conv_row0;
  if (g->c_pixel_stride == 0) return g->c + (size_t)row * g->ldc;
  return g->c + (row / g->conv_w) * g->c_line_stride + (row % g->conv_w) * g->c_pixel_stride;
}

/* The part's row buffer (a conv's), or NULL. */
static inline float *row_buffer(const struct gemm *g, int part) {
  return g->row_buffers != NULL ? g->row_buffers + (size_t)part * g->row_stride : NULL;
}

/* 32 consecutive floats -> 16 bf16 pairs (k, k+1) as 32-bit words. */
BF16_TARGET static inline void convert_pairs(const float *src, uint32_t *out) {
  /* cvtne2ps: elements 0-15 from the second operand, 16-31 from the first. */
  const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
  _mm512_storeu_si512((void *)out, pairs);
}

/* A tile t (rows t*MR ...) into [k2][MR]; rows past M and the odd k are zero. */
BF16_TARGET static void pack_a_tile(const struct gemm *g, int tile, float *buffer) {
  uint32_t *dst = g->packed_a + (size_t)tile * g->k2 * MR;
  const int row0 = tile * MR;
  const float *normalised = normalised_rows(g, row0, MR, buffer);
  for (int r = 0; r < MR; r++) {
    const int row = row0 + r;
    if (row >= g->m) {
      for (int kp = 0; kp < g->k2; kp++) dst[(size_t)kp * MR + r] = 0;
      continue;
    }
    if (!g->trans_a) {
      const float *src = normalised ? normalised + (size_t)r * g->k : a_row(g, row, buffer);
      int kp = 0;
      for (; 2 * kp + 32 <= g->k; kp += 16) {  /* 16 pairs converted at once */
        uint32_t tmp[16];
        convert_pairs(src + 2 * kp, tmp);
        for (int i = 0; i < 16; i++) dst[(size_t)(kp + i) * MR + r] = tmp[i];
      }
      for (; 2 * kp + 1 < g->k; kp++) dst[(size_t)kp * MR + r] = pair(src[2 * kp], src[2 * kp + 1]);
      if (kp < g->k2) dst[(size_t)kp * MR + r] = pair(src[2 * kp], 0.0f);
    } else {
      for (int kp = 0; kp < g->k2; kp++) {
        const float lo = get(g->a, g->lda, 1, row, 2 * kp);
        const float hi = 2 * kp + 1 < g->k ? get(g->a, g->lda, 1, row, 2 * kp + 1) : 0.0f;
        dst[(size_t)kp * MR + r] = pair(lo, hi);
      }
    }
  }
}

/* Interleave two rows of 16 floats into 16 bf16 pairs (one 512-bit vector). */
BF16_TARGET static inline __m512i interleave_rows(__m512 lo, __m512 hi) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  /* cvtne2ps: elements 0-15 from the second operand, 16-31 from the first. */
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  return _mm512_permutexvar_epi16(order, both);
}

/* In-register transpose of a 16 x 16 block of 32-bit words: rows[e][i] <- rows[i][e]. */
BF16_TARGET static inline void transpose16(__m512i rows[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; i++) {
    a[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  /* b[4i + j], 128-bit lane L: words 4L + j of rows 4i .. 4i + 3 */
  for (int i = 0; i < 4; i++) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; j++) {  /* gather lane L of b[j], b[4 + j], b[8 + j], b[12 + j] */
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    rows[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);       /* lane 0 */
    rows[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);   /* lane 1 */
    rows[8 + j] = _mm512_shuffle_i32x4(c0, d0, 0xDD);   /* lane 2 */
    rows[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xDD);  /* lane 3 */
  }
}

/* Row k, columns col .. col + 16 (mask: those before N) of the 8-bit B dequantized in float32
 * with its group's scale and bias: value * scale, then + bias, two roundings, as the plain MLX
 * form computes it (this file is built without fused multiply-adds). Columns past N are zero. */
BF16_TARGET static inline __m512 dequantized_row(const struct gemm *g, int k, int col, __mmask16 mask, __m512 scale,
                                                 __m512 bias) {
  const __m128i bytes = _mm_maskz_loadu_epi8(mask, g->q_values + (size_t)k * g->n + col);
  const __m512 value = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  return _mm512_add_ps(_mm512_mul_ps(value, scale), bias);
}

/* B panel p from the 8-bit values: no float32 B exists; each k pair is dequantized, rounded to
 * bf16 and interleaved exactly as pack_b_rows does a float B holding the dequantized values. */
BF16_TARGET static void pack_b_q8(const struct gemm *g, int panel, uint32_t *dst) {
  const int col0 = panel * NR;
  const int cols = g->n - col0 < NR ? g->n - col0 : NR;
  const __mmask16 masks[2] = {cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1),
                              cols >= 32 ? (__mmask16)0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1)};
  for (int kp = 0; kp < g->k2; kp++)
    for (int half = 0; half < 2; half++) {
      const int col = col0 + 16 * half, k0 = 2 * kp;
      const __mmask16 mask = masks[half];
      const size_t group = (size_t)(k0 / g->q_group) * g->n + col;
      __m512 scale = _mm512_maskz_loadu_ps(mask, g->q_scales + group);
      __m512 bias = _mm512_maskz_loadu_ps(mask, g->q_biases + group);
      const __m512 lo = dequantized_row(g, k0, col, mask, scale, bias);
      __m512 hi = _mm512_setzero_ps();
      if (k0 + 1 < g->k) {
        if ((k0 + 1) % g->q_group == 0) {  /* an odd group size: the pair straddles two groups */
          const size_t next = group + (size_t)g->n;
          scale = _mm512_maskz_loadu_ps(mask, g->q_scales + next);
          bias = _mm512_maskz_loadu_ps(mask, g->q_biases + next);
        }
        hi = dequantized_row(g, k0 + 1, col, mask, scale, bias);
      }
      _mm512_storeu_si512((void *)(dst + (size_t)kp * NR + 16 * half), interleave_rows(lo, hi));
    }
}

/* B panel p from MLX's 4-bit layout of W (B = W^T, struct gemm's q4_packed): per column (a row of W), 32 k at
 * a time, the 16 bytes' low nibbles are the even k and the high ones the odd k, so each pair (k, k + 1) is
 * (low, high) of one byte: dequantized (value * scale, then + bias, as mx.dequantize) and rounded to bf16
 * pairs by interleave_rows, then 16 columns transposed in registers, as pack_b_rows does a float W^T.
 * Columns past N are zero; K is a multiple of the group size, itself of 32. */
BF16_TARGET static void pack_b_q4(const struct gemm *g, int panel, uint32_t *dst) {
  const int col0 = panel * NR, groups = g->k / g->q_group;
  const __m512i low_nibbles = _mm512_set1_epi32(0xF);
  for (int kp = 0; kp < g->k2; kp += 16)
    for (int half = 0; half < 2; half++) {
      __m512i rows[16];
      for (int i = 0; i < 16; i++) {
        const int n = col0 + 16 * half + i;
        if (n >= g->n) {
          rows[i] = _mm512_setzero_si512();
          continue;
        }
        const uint8_t *bytes = (const uint8_t *)(g->q4_packed + (size_t)n * (g->k / 8)) + kp;
        const __m512i words = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
        const size_t group = (size_t)n * groups + (size_t)(2 * kp) / g->q_group;
        const __m512 scale = _mm512_set1_ps(g->q_scales[group]), bias = _mm512_set1_ps(g->q_biases[group]);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(words, low_nibbles));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(words, 4));
        rows[i] = interleave_rows(_mm512_add_ps(_mm512_mul_ps(lo, scale), bias),
                                  _mm512_add_ps(_mm512_mul_ps(hi, scale), bias));
      }
      transpose16(rows);
      for (int e = 0; e < 16; e++) _mm512_storeu_si512((void *)(dst + (size_t)(kp + e) * NR + 16 * half), rows[e]);
    }
}

/* B panel p (columns p*NR ...) into dst [k2][NR] pairs; columns past N are zero. */
BF16_TARGET static void pack_b_rows(const struct gemm *g, int panel, uint32_t *dst) {
  if (g->q_values != NULL) {
    pack_b_q8(g, panel, dst);
    return;
  }
  if (g->q4_packed != NULL) {
    pack_b_q4(g, panel, dst);
    return;
  }
  const int col0 = panel * NR;
  const int cols = g->n - col0 < NR ? g->n - col0 : NR;
  if (!g->trans_b && cols == NR) {
    /* Rows k and k+1 are contiguous along the columns: convert and interleave 16 at a time. */
    for (int kp = 0; kp < g->k2; kp++) {
      const float *r0 = g->b + (size_t)(2 * kp) * g->ldb + col0;
      const int has_hi = 2 * kp + 1 < g->k;
      for (int half = 0; half < 2; half++) {
        const __m512 lo = _mm512_loadu_ps(r0 + 16 * half);
        const __m512 hi = has_hi ? _mm512_loadu_ps(r0 + g->ldb + 16 * half) : _mm512_setzero_ps();
        _mm512_storeu_si512((void *)(dst + (size_t)kp * NR + 16 * half), interleave_rows(lo, hi));
      }
    }
    return;
  }
  if (g->trans_b && cols == NR) {
    /* B(k, c) = b[c * ldb + k]: a column's k pairs are contiguous. Blocks of 16 columns x
     * 16 pairs are converted (one vector per column) and transposed in registers. */
    int kp = 0;
    for (; 2 * kp + 32 <= g->k; kp += 16)
      for (int half = 0; half < 2; half++) {
        __m512i rows[16];
        for (int i = 0; i < 16; i++) {
          const float *src = g->b + (size_t)(col0 + 16 * half + i) * g->ldb + 2 * kp;
          rows[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        }
        transpose16(rows);
        for (int e = 0; e < 16; e++) _mm512_storeu_si512((void *)(dst + (size_t)(kp + e) * NR + 16 * half), rows[e]);
      }
    for (; kp < g->k2; kp++)
      for (int c = 0; c < NR; c++) {
        const float *src = g->b + (size_t)(col0 + c) * g->ldb;
        dst[(size_t)kp * NR + c] = pair(src[2 * kp], 2 * kp + 1 < g->k ? src[2 * kp + 1] : 0.0f);
      }
    return;
  }
  for (int kp = 0; kp < g->k2; kp++)
    for (int c = 0; c < NR; c++) {
      if (c >= cols) {
        dst[(size_t)kp * NR + c] = 0;
        continue;
      }
      const float lo = get(g->b, g->ldb, g->trans_b, 2 * kp, col0 + c);
      const float hi = 2 * kp + 1 < g->k ? get(g->b, g->ldb, g->trans_b, 2 * kp + 1, col0 + c) : 0.0f;
      dst[(size_t)kp * NR + c] = pair(lo, hi);
    }
}

/* pack_b_rows, then the AMX chunks' padding rows (pairs past k2) zeroed. */
BF16_TARGET static void pack_b_panel(const struct gemm *g, int panel, uint32_t *dst) {
  pack_b_rows(g, panel, dst);
  if (g->b_rows > g->k2) memset(dst + (size_t)g->k2 * NR, 0, (size_t)(g->b_rows - g->k2) * NR * sizeof(uint32_t));
}

/* Whether C's values go through more than alpha, beta and the bias as they are stored. */
static inline int has_epilogue(const struct gemm *g) {
  return g->ex.silu || g->ex.residual != NULL || g->ex.shortcut != NULL;
}

/* The extras' shortcut of row `row`, columns col0 .. col0 + 16 (mask: those before N), its bias added. */
BF16_TARGET static inline __m512 shortcut_of(const struct gemm *g, int row, int col0, __mmask16 mask) {
  const float *src = g->ex.shortcut + (size_t)(row + g->conv_row0) * g->ex.shortcut_channels + g->ex.shortcut_first +
                     (size_t)g->ex.shortcut_step * col0;
  __m512 t;
  if (g->ex.shortcut_step == 1) {
    t = _mm512_maskz_loadu_ps(mask, src);
  } else {
    const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(g->ex.shortcut_step));
    t = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, lanes, src, 4);
  }
  if (g->ex.shortcut_bias != NULL) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, g->ex.shortcut_bias + col0));
  return t;
}

/* Row `row` of C, columns col0 .. col0 + 32 (mask0 / mask1: those before N), stored from the sums
 * v0, v1: alpha, beta, the bias, then the extras' SiLU and gated residual, each rounded as the
 * separate operation it replaces. */
BF16_TARGET static inline void store_row(const struct gemm *g, int row, int col0, __m512 v0, __m512 v1,
                                         __mmask16 mask0, __mmask16 mask1) {
  float *c = c_row(g, row) + col0;
  v0 = _mm512_mul_ps(_mm512_set1_ps(g->alpha), v0);
  v1 = _mm512_mul_ps(_mm512_set1_ps(g->alpha), v1);
  if (g->ex.shortcut != NULL) {  /* (shortcut + its bias) + sums: an addend made beforehand would round so */
    v0 = _mm512_add_ps(shortcut_of(g, row, col0, mask0), v0);
    v1 = _mm512_add_ps(shortcut_of(g, row, col0 + 16, mask1), v1);
  }
  if (g->beta != 0.0f) {  /* beta == 0: C is not read (it may hold anything) */
    const __m512 beta = _mm512_set1_ps(g->beta);
    v0 = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mask0, c), v0);
    v1 = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mask1, c + 16), v1);
  }
  if (g->bias != NULL) {  /* after the sum, as a separate addition of the bias would round */
    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(mask0, g->bias + col0));
    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask1, g->bias + col0 + 16));
  }
  if (g->ex.silu) {
    v0 = (__m512)((v16f)v0 * logistic16((v16f)v0));
    v1 = (__m512)((v16f)v1 * logistic16((v16f)v1));
  }
  if (g->ex.residual != NULL) {  /* residual + gate * value: the gated residual's two roundings */
    const size_t at = (size_t)(row + g->conv_row0) * g->ldc + col0;
    if (g->ex.gate != NULL) {
      const float *gate = g->ex.gate + (size_t)((row + g->conv_row0) / g->ex.gate_rows) * g->n + col0;
      v0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask0, gate), v0);
      v1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask1, gate + 16), v1);
    }
    v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, g->ex.residual + at), v0);
    v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, g->ex.residual + at + 16), v1);
  }
  _mm512_mask_storeu_ps(c, mask0, v0);
  _mm512_mask_storeu_ps(c + 16, mask1, v1);
}

/* One MR x NR tile of C from a packed A tile and a packed B panel. */
BF16_TARGET static void tile_kernel(const struct gemm *g, const uint32_t *a, const uint32_t *b, int row0, int col0) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int kp = 0; kp < g->k2; kp++) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)(b + (size_t)kp * NR));
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void *)(b + (size_t)kp * NR + 16));
    const uint32_t *ak = a + (size_t)kp * MR;
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32((int)ak[r]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const int rows = g->m - row0 < MR ? g->m - row0 : MR;
  const int cols = g->n - col0 < NR ? g->n - col0 : NR;
  const __mmask16 mask0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
  const __mmask16 mask1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  for (int r = 0; r < rows; r++) store_row(g, row0 + r, col0, acc[r][0], acc[r][1], mask0, mask1);
}

/* Part i packs its share of A's tiles, waits until every part has, then runs its share of
 * B's panels against all of A. */
static void run_part(void *arg, int part, int parts) {
  struct gemm *g = arg;
  const int tiles = (g->m + MR - 1) / MR;
  for (int t = (int)((long)tiles * part / parts); t < (int)((long)tiles * (part + 1) / parts); t++)
    pack_a_tile(g, t, row_buffer(g, part));
  __atomic_add_fetch(&g->packed_parts, 1, __ATOMIC_ACQ_REL);
  while (__atomic_load_n(&g->packed_parts, __ATOMIC_ACQUIRE) < parts) sched_yield();
  const int first = (int)((long)g->panels * part / parts), last = (int)((long)g->panels * (part + 1) / parts);
  uint32_t *block = g->panel_buffers + (size_t)part * PANEL_BLOCK * g->b_rows * NR;
  /* PANEL_BLOCK panels at a time against each A tile: the tile is read from cache once per
   * block instead of once per panel (A can be megabytes: 16 K rows x K = 192 in FastViTHD). */
  for (int p0 = first; p0 < last; p0 += PANEL_BLOCK) {
    const int count = last - p0 < PANEL_BLOCK ? last - p0 : PANEL_BLOCK;
    for (int i = 0; i < count; i++) pack_b_panel(g, p0 + i, block + (size_t)i * g->k2 * NR);
    for (int t = 0; t < tiles; t++)
      for (int i = 0; i < count; i++)
        tile_kernel(g, g->packed_a + (size_t)t * g->k2 * MR, block + (size_t)i * g->k2 * NR, t * MR, (p0 + i) * NR);
  }
}

#ifdef HAVE_AMX
/* TDPBF16PS's operands are tiles of 16 rows x 64 bytes: C 16 x 16 float32, A 16 rows x 16
 * k-pairs, B 16 k-pairs x 16 columns. Every tile register is configured so. */
struct tile_config {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define AMX_CHUNK_WORDS (AMX_ROWS * AMX_PAIRS) /* one A tile: 16 rows x one 32-k chunk */

/* A tile t (rows t*16 ...) into dst [b_rows / 16][16 rows][16 pairs]: each 32-k chunk of the
 * tile is one contiguous 1 KB tile load. Rows past M and pairs past K are zero. */
BF16_TARGET static void pack_a_amx_tile(const struct gemm *g, int tile, uint32_t *dst, float *buffer) {
  const float *normalised = normalised_rows(g, tile * AMX_ROWS, AMX_ROWS, buffer);
  for (int r = 0; r < AMX_ROWS; r++) {
    const int row = tile * AMX_ROWS + r;
    uint32_t *out = dst + r * AMX_PAIRS;
#define AT(kp) out[(size_t)((kp) / AMX_PAIRS) * AMX_CHUNK_WORDS + (kp) % AMX_PAIRS]
    int kp = 0;
    if (row < g->m && !g->trans_a) {
      const float *src = normalised ? normalised + (size_t)r * g->k : a_row(g, row, buffer);
      for (; 2 * kp + 32 <= g->k; kp += AMX_PAIRS) convert_pairs(src + 2 * kp, &AT(kp));
      for (; 2 * kp + 1 < g->k; kp++) AT(kp) = pair(src[2 * kp], src[2 * kp + 1]);
      if (kp < g->k2) {
        AT(kp) = pair(src[2 * kp], 0.0f);
        kp++;
      }
    } else if (row < g->m) {
      for (; kp < g->k2; kp++) {
        const float lo = get(g->a, g->lda, 1, row, 2 * kp);
        const float hi = 2 * kp + 1 < g->k ? get(g->a, g->lda, 1, row, 2 * kp + 1) : 0.0f;
        AT(kp) = pair(lo, hi);
      }
    }
    for (; kp < g->b_rows; kp++) AT(kp) = 0;
#undef AT
  }
}

/* A block of C, rows row0 .. row0 + 16 * a_tiles, columns col0 .. col0 + 32, from the A tile
 * at a (and the next one) and the B panel b over the full K: tmm0-3 hold C, tmm4-5 A, tmm6-7
 * the panel's two 16-column halves. A whole block with alpha 1 and beta 0 or 1 goes straight
 * between C and the tiles; the others (M or N tails, other scalars) through a buffer. */
AMX_TARGET static inline __attribute__((always_inline)) void amx_block(const struct gemm *g, const uint32_t *a,
                                                                        const int a_tiles, const uint32_t *b,
                                                                        int row0, int col0) {
  const int chunks = g->b_rows / AMX_PAIRS;
  const size_t a_next = (size_t)chunks * AMX_CHUNK_WORDS;
  const int rows = g->m - row0 < AMX_ROWS * a_tiles ? g->m - row0 : AMX_ROWS * a_tiles;
  const int cols = g->n - col0 < NR ? g->n - col0 : NR;
  /* A bias row goes through the buffer too: added after the sums, in the store. */
  const int direct = rows == AMX_ROWS * a_tiles && cols == NR && g->alpha == 1.0f &&
                     (g->beta == 0.0f || g->beta == 1.0f) && g->bias == NULL && !has_epilogue(g) &&
                     g->c_pixel_stride == 0;
  float *c = c_row(g, row0) + col0;  /* (a scattered C's rows: each its own address, below) */
  float *c_low = c + (size_t)AMX_ROWS * g->ldc;
  const long c_stride = (long)g->ldc * (long)sizeof(float);
  if (direct && g->beta == 1.0f) {
    _tile_loadd(0, c, c_stride);
    _tile_loadd(1, c + 16, c_stride);
    if (a_tiles == 2) {
      _tile_loadd(2, c_low, c_stride);
      _tile_loadd(3, c_low + 16, c_stride);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if (a_tiles == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  for (int chunk = 0; chunk < chunks; chunk++) {
    const uint32_t *bk = b + (size_t)chunk * AMX_PAIRS * NR, *ak = a + (size_t)chunk * AMX_CHUNK_WORDS;
    _tile_loadd(6, bk, NR * sizeof(uint32_t));
    _tile_loadd(7, bk + 16, NR * sizeof(uint32_t));
    _tile_loadd(4, ak, AMX_PAIRS * sizeof(uint32_t));
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (a_tiles == 2) {
      _tile_loadd(5, ak + a_next, AMX_PAIRS * sizeof(uint32_t));
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (direct) {
    _tile_stored(0, c, c_stride);
    _tile_stored(1, c + 16, c_stride);
    if (a_tiles == 2) {
      _tile_stored(2, c_low, c_stride);
      _tile_stored(3, c_low + 16, c_stride);
    }
    return;
  }
  float acc[4][AMX_ROWS * 16] __attribute__((aligned(64)));  /* [row tile][column half] */
  _tile_stored(0, acc[0], 64);
  _tile_stored(1, acc[1], 64);
  if (a_tiles == 2) {
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
  }
  const __mmask16 mask0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
  const __mmask16 mask1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  for (int r = 0; r < rows; r++) {
    const float *sums = acc[2 * (r / AMX_ROWS)] + (r % AMX_ROWS) * 16;
    store_row(g, row0 + r, col0, _mm512_load_ps(sums), _mm512_load_ps(sums + AMX_ROWS * 16), mask0, mask1);
  }
}

/* The extras' row epilogue (RMSNorm [+ residual]) over C's rows [begin, end), whole and in cache:
 * in place, on the calling thread. */
static void finish_rows(const struct gemm *g, long begin, long end) {
  if (g->ex.row_weight == NULL || begin >= end) return;
  float *c = g->c + (size_t)g->conv_row0 * g->ldc;
  const float *residual = g->ex.row_residual ? g->ex.row_residual + (size_t)g->conv_row0 * g->ldc : NULL;
  mobileo_rms_norm_residual_rows(c, residual, g->ex.row_weight, g->ex.row_bias, g->ex.row_eps, g->n, begin, end, c);
}

AMX_TARGET static void load_tile_config(void) {
  struct tile_config config;
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int i = 0; i < 8; i++) {
    config.colsb[i] = 64;
    config.rows[i] = AMX_ROWS;
  }
  _tile_loadconfig(&config);
}

/* run_part with AMX tiles: A in 16-row tiles, C in 32 x 32 blocks (16 x 32 for an odd last
 * tile). The tile configuration is loaded once per part and released at its end. */
AMX_TARGET static void run_part_amx(void *arg, int part, int parts) {
  struct gemm *g = arg;
  const int tiles = (g->m + AMX_ROWS - 1) / AMX_ROWS;
  const size_t tile_words = (size_t)(g->b_rows / AMX_PAIRS) * AMX_CHUNK_WORDS;
  for (int t = (int)((long)tiles * part / parts); t < (int)((long)tiles * (part + 1) / parts); t++)
    pack_a_amx_tile(g, t, g->packed_a + (size_t)t * tile_words, row_buffer(g, part));
  __atomic_add_fetch(&g->packed_parts, 1, __ATOMIC_ACQ_REL);
  while (__atomic_load_n(&g->packed_parts, __ATOMIC_ACQUIRE) < parts) sched_yield();
  load_tile_config();
  const int first = (int)((long)g->panels * part / parts), last = (int)((long)g->panels * (part + 1) / parts);
  uint32_t *block = g->panel_buffers + (size_t)part * g->panel_block * g->b_rows * NR;
  for (int p0 = first; p0 < last; p0 += g->panel_block) {
    const int count = last - p0 < g->panel_block ? last - p0 : g->panel_block;
    for (int i = 0; i < count; i++) pack_b_panel(g, p0 + i, block + (size_t)i * g->b_rows * NR);
    __asm__ volatile("" ::: "memory");  /* the tile loads are asm that does not name the panels */
    for (int t = 0; t < tiles; t += 2)
      for (int i = 0; i < count; i++) {
        const uint32_t *a = g->packed_a + (size_t)t * tile_words, *b = block + (size_t)i * g->b_rows * NR;
        if (t + 1 < tiles)
          amx_block(g, a, 2, b, t * AMX_ROWS, (p0 + i) * NR);
        else
          amx_block(g, a, 1, b, t * AMX_ROWS, (p0 + i) * NR);
      }
  }
  _tile_release();
}

/* AMX with the parts split over A's rows instead, when all of B fits in one block (the DC-AE's
 * window GEMMs: tens of thousands of rows, K and N of 128-512): each part packs all of B, then
 * packs two A tiles at a time into a buffer of its own and runs them against every panel, so
 * packed A never leaves the L1 cache (the panel split writes it whole and reads it once per part). */
AMX_TARGET static void run_part_amx_rows(void *arg, int part, int parts) {
  struct gemm *g = arg;
  const int tiles = (g->m + AMX_ROWS - 1) / AMX_ROWS, pairs = (tiles + 1) / 2;
  const size_t tile_words = (size_t)(g->b_rows / AMX_PAIRS) * AMX_CHUNK_WORDS, panel_words = (size_t)g->b_rows * NR;
  uint32_t *a = g->packed_a + (size_t)part * 2 * g->pair_group * tile_words;
  uint32_t *panels = g->panel_buffers + (size_t)part * g->panels * panel_words;
  for (int p = 0; p < g->panels; p++) pack_b_panel(g, p, panels + (size_t)p * panel_words);
  load_tile_config();
  const int last = (int)((long)pairs * (part + 1) / parts);
  for (int first = (int)((long)pairs * part / parts); first < last; first += g->pair_group) {
    const int group = last - first < g->pair_group ? last - first : g->pair_group;
    for (int t = 2 * first; t < 2 * (first + group) && t < tiles; t++)
      pack_a_amx_tile(g, t, a + (size_t)(t - 2 * first) * tile_words, row_buffer(g, part));
    __asm__ volatile("" ::: "memory");  /* the tile loads are asm that does not name the tiles */
    for (int p = 0; p < g->panels; p++)
      for (int i = 0; i < group; i++) {
        const int t = 2 * (first + i);
        const uint32_t *tile = a + (size_t)2 * i * tile_words, *b = panels + (size_t)p * panel_words;
        if (t + 1 < tiles)
          amx_block(g, tile, 2, b, t * AMX_ROWS, p * NR);
        else
          amx_block(g, tile, 1, b, t * AMX_ROWS, p * NR);
      }
    const long rows_end = (long)2 * (first + group) * AMX_ROWS;
    finish_rows(g, (long)2 * first * AMX_ROWS, rows_end < g->m ? rows_end : g->m);  /* these rows are whole */
  }
  _tile_release();
}

/* CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24), and Linux's leave to use the tile
 * data (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; process-wide, asked once). */
static int amx_permitted(void) {
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return 0;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#else
static int amx_permitted(void) { return 0; }
#endif

int mobileo_bf16_gemm_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

/* The packing buffers, kept between calls: a fresh multi-megabyte allocation is mmap-ed and
 * page-faulted every call (measured: the DC-AE's 3x3 convs, 9 products per band, lost more
 * than bf16 gained). Grows to the largest product seen, up to SCRATCH_KEEP bytes (larger
 * ones get their own allocation, freed at the next call), and is freed at the end of a
 * pipeline stage (mobileo_bf16_release). */
#define SCRATCH_KEEP ((size_t)256 << 20)
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void *scratch_memory = NULL;
static size_t scratch_size = 0;

/* A forked child may inherit the lock held by a thread it does not have: start afresh. */
static void scratch_after_fork(void) {
  pthread_mutex_init(&scratch_lock, NULL);
  scratch_memory = NULL;
  scratch_size = 0;
}

static uint32_t *scratch(size_t bytes) {
  static int atfork_registered = 0;
  if (!atfork_registered) {
    pthread_atfork(NULL, NULL, scratch_after_fork);
    atfork_registered = 1;
  }
  bytes = (bytes + 63) / 64 * 64;
  if (bytes <= scratch_size) return scratch_memory;
  free(scratch_memory);
  scratch_memory = aligned_alloc(64, bytes);
  scratch_size = scratch_memory ? bytes : 0;
  if (scratch_memory && bytes > SCRATCH_KEEP) scratch_size = 0;  /* used once, replaced next call */
  return scratch_memory;
}

/* Frees the packing buffers. */
void mobileo_bf16_release(void) {
  pthread_mutex_lock(&scratch_lock);
  free(scratch_memory);
  scratch_memory = NULL;
  scratch_size = 0;
  pthread_mutex_unlock(&scratch_lock);
}

static long products_done = 0, amx_products_done = 0;

long mobileo_bf16_products_done(void) { return __atomic_load_n(&products_done, __ATOMIC_RELAXED); }
long mobileo_bf16_amx_products_done(void) { return __atomic_load_n(&amx_products_done, __ATOMIC_RELAXED); }

/* The kernel, chosen once per process: AMX where the CPU has it and Linux grants the tile
 * state, unless MOBILEO_MLX_BF16_GEMM=avx512 (amx, auto or anything else: AMX where it runs).
 * AMX takes every size: measured from one row up (K 512-4096), it beat the register tile at
 * each, since the packing of B, shared by both, is most of a small product's time. */
enum { KERNEL_AVX512 = 1, KERNEL_AMX = 2 };
static pthread_once_t kernel_once = PTHREAD_ONCE_INIT;
static int kernel_choice = KERNEL_AVX512, amx_here = 0;

static void choose_kernel(void) {
  const char *wanted = getenv("MOBILEO_MLX_BF16_GEMM");
  amx_here = amx_permitted();
  kernel_choice = amx_here && !(wanted != NULL && strcmp(wanted, "avx512") == 0) ? KERNEL_AMX : KERNEL_AVX512;
}

static int kernel(void) {
  pthread_once(&kernel_once, choose_kernel);
  return kernel_choice;
}

int mobileo_bf16_amx_available(void) {
  if (!mobileo_bf16_gemm_supported()) return 0;
  pthread_once(&kernel_once, choose_kernel);
  return amx_here;
}

const char *mobileo_bf16_gemm_kernel(void) {
  if (!mobileo_bf16_gemm_supported()) return "none";
  return kernel() == KERNEL_AMX ? "amx" : "avx512-bf16";
}

/* Packs and multiplies the product g describes (its operands, sizes and scalars set);
 * waits its turn for the packing buffers and the pool. */
static int run_gemm(struct gemm g) {
  const int amx = kernel() == KERNEL_AMX;
  const int m = g.m, n = g.n, k = g.k, k2 = (k + 1) / 2;
  g.k2 = k2;
  g.b_rows = amx ? (k2 + AMX_PAIRS - 1) / AMX_PAIRS * AMX_PAIRS : k2;
  g.panels = (n + NR - 1) / NR;
  g.packed_parts = 0;
  const int tile_rows = amx ? AMX_ROWS : MR, tiles = (m + tile_rows - 1) / tile_rows;
  const int threads = mobileo_pool_threads(0);
  const size_t panel_words = (size_t)g.b_rows * NR;
  g.panel_block = PANEL_BLOCK;
  if (amx) {
    const size_t fit = AMX_BLOCK_BYTES / (panel_words * sizeof(uint32_t));
    g.panel_block = fit < 1 ? 1 : fit > AMX_PANEL_BLOCK ? AMX_PANEL_BLOCK : (int)fit;
  }
  /* AMX over rows: B in one block, and a pair of A tiles for every part (and more). A conv with
   * many rows too, whatever B's size: packed whole, its A would be K / C times the input; each
   * part packs all of B (from L2 or the L3 cache as the A tiles pass), which costs little once
   * a part has CONV_ROWS_PER_PART rows to multiply. */
  const int by_rows = amx && (tiles + 1) / 2 >= 2 * threads &&
                      (g.panels <= g.panel_block || (g.conv_x != NULL && m >= CONV_ROWS_PER_PART * threads));
  int parts = threads;
  if (!by_rows && parts > g.panels) parts = g.panels;
  size_t a_words, b_words;
  /* Over rows with more of B per part than a core's L2 holds (AMX_L2_BYTES; a conv's with K and N of
   * 512: 4.7 MB): pairs of A tiles in groups of about AMX_GROUP_BYTES, so each panel is read from the
   * L3 cache once per group instead of once per pair. */
  const size_t pair_bytes = (size_t)2 * g.b_rows * AMX_ROWS * sizeof(uint32_t);
  g.pair_group = 1;
  if (by_rows && (size_t)g.panels * panel_words * sizeof(uint32_t) > AMX_L2_BYTES && pair_bytes < AMX_GROUP_BYTES)
    g.pair_group = (int)(AMX_GROUP_BYTES / pair_bytes);
  if (by_rows) {
    a_words = (size_t)parts * 2 * g.pair_group * g.b_rows * AMX_ROWS;
    b_words = (size_t)parts * g.panels * panel_words;
  } else {
    a_words = (size_t)tiles * g.b_rows * tile_rows;
    b_words = (size_t)parts * g.panel_block * panel_words;
  }
  /* a conv's row buffer, a normalised A's tile of rows; 64-byte aligned */
  g.row_stride = g.conv_x != NULL ? ((size_t)k + 15) / 16 * 16
                 : g.ex.norm_shift != NULL ? (size_t)AMX_ROWS * (((size_t)k + 15) / 16 * 16) : 0;
  const size_t row_words = (size_t)parts * g.row_stride;
  if (pthread_mutex_lock(&scratch_lock) != 0) return -1;
  uint32_t *buffer = scratch((a_words + b_words + row_words) * sizeof(uint32_t));
  int code = -1;
  if (buffer) {
    g.packed_a = buffer;
    g.panel_buffers = buffer + a_words;
    g.row_buffers = g.row_stride != 0 ? (float *)(buffer + a_words + b_words) : NULL;
#ifdef HAVE_AMX
    code = mobileo_pool_run(by_rows ? run_part_amx_rows : amx ? run_part_amx : run_part, &g, parts, 1);
#else
    code = mobileo_pool_run(run_part, &g, parts, 1);
#endif
    /* the row epilogue where the parts did not make it row group by row group: one pass, every core */
    if (code == 0 && g.ex.row_weight != NULL && !by_rows) {
      float *c = g.c + (size_t)g.conv_row0 * g.ldc;
      const float *residual = g.ex.row_residual ? g.ex.row_residual + (size_t)g.conv_row0 * g.ldc : NULL;
      const struct mobileo_rows rows = {1, {g.m}, {g.ldc}};
      code = mobileo_rms_norm_residual(c, &rows, residual, &rows, g.ex.row_weight, g.ex.row_bias, g.ex.row_eps, g.m,
                                       g.n, c);
    }
    if (code == 0) __atomic_add_fetch(&products_done, 1, __ATOMIC_RELAXED);
    if (code == 0 && amx) __atomic_add_fetch(&amx_products_done, 1, __ATOMIC_RELAXED);
  }
  pthread_mutex_unlock(&scratch_lock);
  return code;
}

/* The graph node's product (primitives.cpp): every size, A transposed or not (a scalar
 * packing loop then), a bias row (or NULL) added as C is stored. -1: no AVX512-BF16, or no memory. */
int mobileo_bf16_gemm(int trans_a, int trans_b, int m, int n, int k, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc, const float *bias) {
  if (m < 1 || n < 1 || k < 1 || !mobileo_bf16_gemm_supported()) return -1;
  const struct gemm g = {.m = m, .n = n, .k = k, .a = a, .b = b, .lda = lda, .ldb = ldb, .trans_a = trans_a != 0,
                         .trans_b = trans_b != 0, .alpha = 1.0f, .beta = beta, .c = c, .ldc = ldc, .bias = bias};
  return run_gemm(g);
}

/* The 8-bit node's product (primitives.cpp): B dequantized from K-major 8-bit values as its
 * panels are packed, the bias row (or NULL) added in the store. -1: no AVX512-BF16, a group
 * size that does not divide K, or no memory. */
int mobileo_bf16_gemm_q8(int trans_a, int m, int n, int k, const float *a, int lda, const uint8_t *values,
                         const float *scales, const float *biases, int group_size, const float *bias, float *c,
                         int ldc, const struct mobileo_gemm_extras *extras) {
  if (m < 1 || n < 1 || k < 1 || group_size < 1 || k % group_size != 0 || !mobileo_bf16_gemm_supported()) return -1;
  struct gemm g = {.m = m, .n = n, .k = k, .a = a, .lda = lda, .trans_a = trans_a != 0, .q_values = values,
                   .q_scales = scales, .q_biases = biases, .q_group = group_size, .bias = bias,
                   .alpha = 1.0f, .beta = 0.0f, .c = c, .ldc = ldc};
  if (extras != NULL) {
    g.ex = *extras;
    if ((g.ex.norm_shift != NULL && (trans_a || lda != k || g.ex.norm_rows < 1 || m % g.ex.norm_rows != 0)) ||
        (g.ex.gate != NULL && (g.ex.residual == NULL || g.ex.gate_rows < 1 || m % g.ex.gate_rows != 0)) ||
        (g.ex.row_weight != NULL && ldc != n) || g.ex.shortcut != NULL)
      return -1;
  }
  return run_gemm(g);
}

/* The 4-bit node's product (primitives.cpp): B = W^T packed straight from MLX's 4-bit affine layout of W, the
 * bias row (or NULL) added in the store. -1: no AVX512-BF16, a group size that is not a multiple of 32 or does
 * not divide K, or no memory. */
int mobileo_bf16_gemm_q4(int m, int n, int k, const float *a, int lda, const uint32_t *packed, const float *scales,
                         const float *biases, int group_size, const float *bias, float *c, int ldc) {
  if (m < 1 || n < 1 || k < 1 || group_size < 32 || group_size % 32 != 0 || k % group_size != 0 ||
      !mobileo_bf16_gemm_supported())
    return -1;
  const struct gemm g = {.m = m, .n = n, .k = k, .a = a, .lda = lda, .q4_packed = packed, .q_scales = scales,
                         .q_biases = biases, .q_group = group_size, .bias = bias, .alpha = 1.0f, .beta = 0.0f,
                         .c = c, .ldc = ldc};
  return run_gemm(g);
}

/* The conv nodes' product (primitives.cpp): A the windows of x (struct gemm's conv_x), B the
 * weight [O, kh, kw, C] read as its transpose [kh kw C, O]; C contiguous, or scattered. */
int mobileo_bf16_conv(const float *x, int batch, int height, int width, int channels, const float *weight, int kh,
                      int kw, int out_channels, int pad_top, int pad_left, const float *bias, int accumulate,
                      float *out, long out_line_stride, long out_pixel_stride,
                      const struct mobileo_gemm_extras *extras) {
  if (batch < 1 || height < 1 || width < 1 || channels < 1 || kh < 1 || kw < 1 || out_channels < 1 ||
      !mobileo_bf16_gemm_supported())
    return -1;
  if (extras != NULL && (extras->norm_shift != NULL || extras->residual != NULL ||
                         ((extras->silu || extras->row_weight != NULL) && out_pixel_stride) ||
                         (extras->shortcut != NULL && (extras->shortcut_step < 1 || extras->shortcut_first < 0))))
    return -1;
  const long m = (long)batch * height * width, k = (long)kh * kw * channels;
  if (m > 0x7fffffffL || k > 0x7fffffffL) return -1;
  struct gemm g = {.m = (int)m, .n = out_channels, .k = (int)k, .b = weight, .ldb = (int)k, .trans_b = 1,
                         .conv_x = x, .conv_h = height, .conv_w = width, .conv_c = channels, .conv_kh = kh,
                         .conv_kw = kw, .conv_pad_top = pad_top, .conv_pad_left = pad_left, .bias = bias,
                         .alpha = 1.0f, .beta = accumulate ? 1.0f : 0.0f, .c = out, .ldc = out_channels,
                         .c_line_stride = out_line_stride, .c_pixel_stride = out_pixel_stride};
  if (extras != NULL) g.ex = *extras;
  if (kernel() == KERNEL_AMX) return run_gemm(g);
  /* The register tile packs A whole: chunks of rows whose packed A stays under CONV_CHUNK_BYTES
   * (whole, a band's A would be kh kw times the input, hundreds of MB). */
  const size_t row_bytes = (size_t)(k + 1) / 2 * sizeof(uint32_t);
  long chunk = (long)(CONV_CHUNK_BYTES / row_bytes) / MR * MR;
  if (chunk < (long)MR * mobileo_pool_threads(0)) chunk = (long)MR * mobileo_pool_threads(0);
  for (long row0 = 0; row0 < m; row0 += chunk) {
    g.conv_row0 = (int)row0;
    g.m = (int)(m - row0 < chunk ? m - row0 : chunk);
    g.packed_parts = 0;
    const int code = run_gemm(g);
    if (code != 0) return code;
  }
  return 0;
}
#endif
