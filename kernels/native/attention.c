/* The two attention cores of the SANA DiT (and the DC-AE's LiteMLA), float32, AVX-512, on every core.
 *
 * Both read q, k, v as [B, heads, rows, d] through their strides (unit stride along d), so the
 * head views the models build from their merged [B, rows, heads * d] projections (SANA's
 * _split_heads, LiteMLA's interleaved [B, N, G, 3, d] groups) are read in place, and both write
 * [B, rows, heads, d_v]: the merged layout the output projection reads.
 *
 * softmax: per (image, head, block of query rows) K^T of the head (grouped-query heads: of its KV
 * head, shared by the group's query heads) packed once into a [d][L16] panel (L16: the keys
 * rounded up to 16, zero columns) by 16 x 16 register transposes, and V row-contiguous into a
 * [L][d_v16] panel (zero columns); then eight query rows at a time (four for a short last group):
 * the scores s = scale * q.k + bias in registers (8 rows x up to 48 keys, or 4 x 80; the key
 * vectors split into blocks as even as they go), stored to a [8][L16] strip in L1; per row its
 * max, p = exp(s - max) and their sum; P V in registers (8 rows x up to 48 columns, or 4 x 96);
 * one division by the sum as the row is stored. Each score and each output is one sum over d /
 * over the keys in their order, whatever the blocks. Causal: a row's keys past its position score
 * -inf, and key blocks none of the group's rows sees are skipped. exp: Cody-Waite reduction
 * x = n ln2 + r (|r| <= ln2/2), a degree-7 Taylor polynomial of exp(r) in Horner form, and 2^n
 * applied by VSCALEFPS; 0 below ln(FLT_MIN) (no denormal or underflowing result: each costs a
 * microcode assist).
 *
 * ReLU linear attention: units of (image, up to 8 adjacent heads: what a unit reads of a row is
 * one span); per head, chunk by chunk of 64 key rows, relu(K) and V copied
 * row-contiguous into L1 (d rounded up to 8 / 16, zero columns) with ksum = sum_n relu(k_n), kv = relu(K)^T V in registers (8 rows x 32 columns or 4 x 64 at a time), then four
 * query rows at a time: relu(q) kv / (relu(q) . ksum + eps). relu keeps NaN (VMAXPS returns its
 * second operand when one is NaN), as MLX's maximum.
 *
 * Compiled for AVX-512F only (target attribute, checked at run time); elsewhere the entry
 * points return -1 and the CPU forms run their MLX twins.
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"
#include "pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,fma")))
#define INLINE static inline __attribute__((always_inline))

/* Below this many multiply-adds one thread does it (waking the others costs more). */
#define PARALLEL_MIN_MACS (1L << 18)

int mobileo_attention_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

/* Just above ln(FLT_MIN) = -87.3365: exp of it is a normal float. */
#define EXP_MIN -87.33f

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* Lanes [0, count) of a 16-lane vector (count may exceed 16). */
INLINE __mmask16 lanes(int count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

/* exp(x) for x <= 0 (also -inf: 0; NaN: NaN); 0 where exp(x) is below the smallest normal float:
 * a result that underflows costs a microcode assist, and masked keys (-inf, a bias of -10000) give
 * one per vector. */
AVX512 INLINE __m512 exp16(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_MIN), _CMP_NLT_UQ); /* NaN too */
  x = _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x); /* the second operand when NaN: NaN stays */
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  /* r = x - n ln2, ln2 split so that n * LN2_HI is exact */
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

/* Rows ahead of the one being read that the loops over strided rows ask for. */
#define PREFETCH_ROWS 8

INLINE void prefetch_row(const float *row, int count) {
  for (int i = 0; i < count; i += 16) __builtin_prefetch(row + i);
}

/* Row r of head (b, h) of a [B, heads, rows, d] view. */
INLINE const float *row_of(const mobileo_heads *x, int b, int h, int r) {
  return x->data + b * x->batch + h * x->head + r * x->row;
}

/* ------------------------------------------------------------------------------ softmax */
/* x[i][t] -> x[t][i] for a 16 x 16 tile. */
AVX512 INLINE void transpose16(__m512 *x) {
  __m512 y[16];
  for (int i = 0; i < 16; i += 2) { /* pairs of rows: 2 x 2 blocks */
    y[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
    y[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) /* 4 x 4 blocks within each 128-bit lane */
    for (int k = 0; k < 2; k++) {
      const __m512d lo = _mm512_castps_pd(y[i + k]), hi = _mm512_castps_pd(y[i + 2 + k]);
      x[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      x[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  for (int i = 0; i < 16; i += 8) /* 128-bit lanes of 4-row groups: 8 x 8 blocks */
    for (int k = 0; k < 4; k++) {
      y[i + k] = _mm512_shuffle_f32x4(x[i + k], x[i + 4 + k], 0x88);
      y[i + 4 + k] = _mm512_shuffle_f32x4(x[i + k], x[i + 4 + k], 0xDD);
    }
  for (int k = 0; k < 8; k++) { /* 16 x 16 */
    x[k] = _mm512_shuffle_f32x4(y[k], y[8 + k], 0x88);
    x[8 + k] = _mm512_shuffle_f32x4(y[k], y[8 + k], 0xDD);
  }
}

#define QUERY_BLOCK 64 /* query rows per unit of work */
#define GROUP_ROWS 8    /* query rows scored, exponentiated and multiplied by V together */

struct softmax_job {
  int batch, heads, group, queries, keys, depth, depth_v, keys16, depth_v16, row_blocks, causal;
  mobileo_heads q, k, v;
  const float *bias; /* [B][keys] or NULL */
  float scale;
  float *out; /* [B][queries][heads][depth_v] */
  float *scratch;
  size_t part_floats;
};

/* Scores of R query rows against keys [key0, key0 + 16 NV) of the packed K^T panel; row r sees
 * keys [0, seen[r]) (-inf past them). */
AVX512 INLINE void scores_block(const struct softmax_job *job, const float *const *q, const float *panel,
                                const float *bias, const int *seen, int key0, float *strip, const int R, const int NV) {
  const int keys16 = job->keys16, keys = job->keys;
  __m512 acc[GROUP_ROWS][5];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
  for (int j = 0; j < job->depth; j++) {
    const float *k_row = panel + (size_t)j * keys16 + key0;
    __m512 kv[5];
    for (int v = 0; v < NV; v++) kv[v] = _mm512_load_ps(k_row + 16 * v);
    for (int r = 0; r < R; r++) {
      const __m512 qj = _mm512_set1_ps(q[r][j]);
      for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(qj, kv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(job->scale), minus_inf = _mm512_set1_ps(-__builtin_inff());
  for (int v = 0; v < NV; v++) {
    const int first = key0 + 16 * v;
    const __mmask16 valid = lanes(keys - first);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
      const __m512 s = _mm512_fmadd_ps(acc[r][v], scale, b);
      _mm512_store_ps(strip + (size_t)r * keys16 + first,
                      _mm512_mask_blend_ps(valid & lanes(seen[r] - first), minus_inf, s));
    }
  }
}

/* out rows (R; `rows` of them stored) = P V / sum for columns [col0, col0 + 16 NV) of the packed V. */
AVX512 INLINE void weighted_block(const struct softmax_job *job, const float *values, const float *strip,
                                  const float *sum, float *const *out, int rows, int seen, int col0, const int R,
                                  const int NV) {
  const int keys16 = job->keys16, depth_v = job->depth_v, width = job->depth_v16;
  __m512 acc[GROUP_ROWS][6];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
  for (int l = 0; l < seen; l++) {
    const float *v_row = values + (size_t)l * width + col0;
    __m512 vv[6];
    for (int c = 0; c < NV; c++) vv[c] = _mm512_load_ps(v_row + 16 * c);
    for (int r = 0; r < R; r++) {
      const __m512 p = _mm512_set1_ps(strip[(size_t)r * keys16 + l]);
      for (int c = 0; c < NV; c++) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
    }
  }
  const __mmask16 last = lanes(depth_v - col0 - 16 * (NV - 1));
  for (int r = 0; r < rows; r++) {
    const __m512 total = _mm512_set1_ps(sum[r]);
    for (int c = 0; c < NV - 1; c++) _mm512_storeu_ps(out[r] + col0 + 16 * c, _mm512_div_ps(acc[r][c], total));
    _mm512_mask_storeu_ps(out[r] + col0 + 16 * (NV - 1), last, _mm512_div_ps(acc[r][NV - 1], total));
  }
}

/* The size of block `block` of `blocks` that split `vectors` 16-wide vectors as evenly as they go
 * (a short last block would leave too few independent sums to hide the multiply-adds' latency). */
static inline int even_block(int vectors, int blocks, int block) {
  return vectors / blocks + (block < vectors % blocks);
}

/* R query rows of head (b, h) from row i (`rows` of them real; the others repeat the last, not
 * stored): eight rows use each K^T and V vector they load for eight multiply-adds (narrow heads,
 * d = 32, gain most); four for a short last group. */
AVX512 INLINE void softmax_rows(const struct softmax_job *job, const float *panel, const float *values, float *strip,
                                int b, int h, int i, int rows, const int R) {
  const int keys = job->keys, keys16 = job->keys16, depth_v = job->depth_v;
  const float *bias = job->bias ? job->bias + (size_t)b * keys : NULL;
  const float *q[GROUP_ROWS];
  float *out[GROUP_ROWS];
  int seen[GROUP_ROWS]; /* keys each row sees (causal: up to its own position) */
  for (int r = 0; r < R; r++) {
    const int row = i + (r < rows ? r : rows - 1);
    q[r] = row_of(&job->q, b, h, row);
    out[r] = job->out + (((size_t)b * job->queries + row) * job->heads + h) * depth_v;
    seen[r] = job->causal && row + 1 + keys - job->queries < keys ? row + 1 + keys - job->queries : keys;
  }
  /* keys no row of the group sees are skipped: their scores, exponentials and products */
  const int group_seen = seen[R - 1], seen16 = round_up(group_seen, 16);
  const int key_vectors = seen16 / 16, most_keys = R == 8 ? 3 : 5;
  const int key_blocks = (key_vectors + most_keys - 1) / most_keys;
  for (int block = 0, key0 = 0; block < key_blocks; block++) {
    const int nv = even_block(key_vectors, key_blocks, block);
    switch (nv) {
      case 1: scores_block(job, q, panel, bias, seen, key0, strip, R, 1); break;
      case 2: scores_block(job, q, panel, bias, seen, key0, strip, R, 2); break;
      case 3: scores_block(job, q, panel, bias, seen, key0, strip, R, 3); break;
      case 4: if (R == 4) scores_block(job, q, panel, bias, seen, key0, strip, 4, 4); break;
      default: if (R == 4) scores_block(job, q, panel, bias, seen, key0, strip, 4, 5); break;
    }
    key0 += 16 * nv;
  }
  /* per row its max, p = exp(s - max) and their sum; the rows side by side (independent chains) */
  __m512 top[GROUP_ROWS], total[GROUP_ROWS];
  float sum[GROUP_ROWS];
  for (int r = 0; r < R; r++) top[r] = _mm512_set1_ps(-__builtin_inff()), total[r] = _mm512_setzero_ps();
  for (int l = 0; l < seen16; l += 16)
    for (int r = 0; r < R; r++) top[r] = _mm512_max_ps(top[r], _mm512_load_ps(strip + (size_t)r * keys16 + l));
  for (int r = 0; r < R; r++) top[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]));
  for (int l = 0; l < seen16; l += 16)
    for (int r = 0; r < R; r++) {
      float *s = strip + (size_t)r * keys16 + l;
      const __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(s), top[r]));
      _mm512_store_ps(s, p);
      total[r] = _mm512_add_ps(total[r], p);
    }
  for (int r = 0; r < R; r++) sum[r] = _mm512_reduce_add_ps(total[r]);
  const int column_vectors = job->depth_v16 / 16, most_columns = R == 8 ? 3 : 6;
  const int column_blocks = (column_vectors + most_columns - 1) / most_columns;
  for (int block = 0, col0 = 0; block < column_blocks; block++) {
    const int nv = even_block(column_vectors, column_blocks, block);
    switch (nv) {
      case 1: weighted_block(job, values, strip, sum, out, rows, group_seen, col0, R, 1); break;
      case 2: weighted_block(job, values, strip, sum, out, rows, group_seen, col0, R, 2); break;
      case 3: weighted_block(job, values, strip, sum, out, rows, group_seen, col0, R, 3); break;
      case 4: if (R == 4) weighted_block(job, values, strip, sum, out, rows, group_seen, col0, 4, 4); break;
      case 5: if (R == 4) weighted_block(job, values, strip, sum, out, rows, group_seen, col0, 4, 5); break;
      default: if (R == 4) weighted_block(job, values, strip, sum, out, rows, group_seen, col0, 4, 6); break;
    }
    col0 += 16 * nv;
  }
}

AVX512 static void softmax_unit(const struct softmax_job *job, float *panel, float *values, float *strip, int b, int h,
                                int block, int pack) {
  const int keys = job->keys, keys16 = job->keys16, depth = job->depth, depth_v = job->depth_v;
  const int h_kv = h / job->group;
  if (pack) { /* K^T of the KV head by 16 x 16 tiles, zero past the keys */
    for (int l0 = 0; l0 < keys16; l0 += 16)
      for (int j0 = 0; j0 < depth; j0 += 16) {
        const __mmask16 columns = lanes(depth - j0);
        __m512 tile[16];
        for (int i = 0; i < 16; i++)
          tile[i] = l0 + i < keys ? _mm512_maskz_loadu_ps(columns, row_of(&job->k, b, h_kv, l0 + i) + j0)
                                  : _mm512_setzero_ps();
        transpose16(tile);
        for (int t = 0; t < 16 && j0 + t < depth; t++) _mm512_store_ps(panel + (size_t)(j0 + t) * keys16 + l0, tile[t]);
      }
    /* V of the KV head row-contiguous, zero columns past depth_v: row_of's rows are a large stride
     * apart (a head's span of the merged rows), unaligned, and share L1 sets */
    for (int l = 0; l < keys; l++) {
      const float *v_row = row_of(&job->v, b, h_kv, l);
      for (int c = 0; c < job->depth_v16; c += 16)
        _mm512_store_ps(values + (size_t)l * job->depth_v16 + c, _mm512_maskz_loadu_ps(lanes(depth_v - c), v_row + c));
    }
  }
  const int first = block * QUERY_BLOCK;
  const int end = first + QUERY_BLOCK < job->queries ? first + QUERY_BLOCK : job->queries;
  for (int i = first; i < end; i += GROUP_ROWS) {
    const int rows = end - i < GROUP_ROWS ? end - i : GROUP_ROWS;
    if (rows > 4)
      softmax_rows(job, panel, values, strip, b, h, i, rows, 8);
    else
      softmax_rows(job, panel, values, strip, b, h, i, rows, 4);
  }
}

static void softmax_part(void *arg, int part, int parts) {
  const struct softmax_job *job = arg;
  float *panel = job->scratch + (size_t)part * job->part_floats;
  float *strip = panel + (size_t)job->depth * job->keys16, *values = strip + (size_t)GROUP_ROWS * job->keys16;
  const long units = (long)job->batch * job->heads * job->row_blocks;
  long packed = -1; /* the (image, KV head) whose K^T and V the panels hold: a group's query heads share them */
  for (long u = units * part / parts; u < units * (part + 1) / parts; u++) {
    const long head = u / job->row_blocks, kv_head = head / job->group;
    softmax_unit(job, panel, values, strip, (int)(head / job->heads), (int)(head % job->heads),
                 (int)(u % job->row_blocks), kv_head != packed);
    packed = kv_head;
  }
}

int mobileo_softmax_attention(int batch, int heads, int heads_kv, int queries, int keys, int depth, int depth_v,
                              mobileo_heads q, mobileo_heads k, mobileo_heads v, const float *key_bias, int causal,
                              float scale, float *out) {
  if (!mobileo_attention_supported() || batch < 1 || heads < 1 || heads_kv < 1 || heads % heads_kv != 0 ||
      queries < 1 || keys < 1 || depth < 1 || depth_v < 1 || (causal && keys < queries))
    return -1;
  struct softmax_job job = {batch, heads, heads / heads_kv, queries, keys, depth, depth_v, round_up(keys, 16),
                            round_up(depth_v, 16),
                            (queries + QUERY_BLOCK - 1) / QUERY_BLOCK, causal != 0, q, k, v, key_bias, scale, out,
                            NULL, 0};
  /* the K^T panel, a group's scores and V, a whole number of cache lines */
  job.part_floats = (size_t)(depth + GROUP_ROWS) * job.keys16 + (size_t)keys * job.depth_v16;
  const long units = (long)batch * heads * job.row_blocks;
  int parts = mobileo_pool_threads(0);
  if (units < parts) parts = (int)units;
  if ((long)batch * heads * queries * keys * (depth + depth_v) < PARALLEL_MIN_MACS) parts = 1;
  job.scratch = aligned_alloc(64, job.part_floats * parts * sizeof(float));
  if (job.scratch == NULL) return -2;
  if (mobileo_pool_run(softmax_part, &job, parts, 1) != 0) softmax_part(&job, 0, 1);
  free(job.scratch);
  return 0;
}

/* ------------------------------------------------------------------ ReLU linear attention */
/* Key rows per chunk of kv's sums: with d = d_v = 32 their copies take 16 KB of L1. */
#define KEY_CHUNK 64

/* Most adjacent heads a unit of work takes. */
#define UNIT_HEADS 8

struct linear_job {
  int batch, heads, queries, keys, depth, depth8, depth_v, depth_v16, unit_heads;
  mobileo_heads q, k, v;
  float eps;
  float *out; /* [B][queries][heads][depth_v] */
  float *scratch;
  size_t part_floats;
};

/* kv rows [j0, j0 + J) x columns [col0, col0 + 16 NV) += sum_n relu(k_n)[j] v_n over the
 * `count` packed key rows of a chunk (the first chunk starts from zero). */
AVX512 INLINE void key_values(const struct linear_job *job, const float *k_chunk, const float *v_chunk, int count,
                              int first, float *kv, int j0, int col0, const int J, const int NV) {
  const int width = job->depth_v16, depth8 = job->depth8;
  __m512 acc[8][4];
  for (int j = 0; j < J; j++)
    for (int c = 0; c < NV; c++)
      acc[j][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(kv + (size_t)(j0 + j) * width + col0 + 16 * c);
  for (int n = 0; n < count; n++) {
    const float *v_row = v_chunk + (size_t)n * width + col0, *k_row = k_chunk + (size_t)n * depth8 + j0;
    __m512 vv[4];
    for (int c = 0; c < NV; c++) vv[c] = _mm512_loadu_ps(v_row + 16 * c);
    for (int j = 0; j < J; j++) {
      const __m512 kj = _mm512_set1_ps(k_row[j]);
      for (int c = 0; c < NV; c++) acc[j][c] = _mm512_fmadd_ps(kj, vv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < J; j++)
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(kv + (size_t)(j0 + j) * width + col0 + 16 * c, acc[j][c]);
}

/* Four query rows (`rows` stored), columns [col0, col0 + 16 NV): relu(q) kv / den. */
AVX512 INLINE void linear_rows4(const struct linear_job *job, const float *const *q, const float *kv,
                                const float *den, float *const *out, int rows, int col0, const int NV) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
  for (int j = 0; j < job->depth; j++) {
    const float *kv_row = kv + (size_t)j * job->depth_v16 + col0;
    __m512 kvv[4];
    for (int c = 0; c < NV; c++) kvv[c] = _mm512_loadu_ps(kv_row + 16 * c);
    for (int r = 0; r < 4; r++) {
      const float qj = q[r][j];
      const __m512 qr = _mm512_set1_ps(qj < 0.0f ? 0.0f : qj); /* relu, NaN kept */
      for (int c = 0; c < NV; c++) acc[r][c] = _mm512_fmadd_ps(qr, kvv[c], acc[r][c]);
    }
  }
  const __mmask16 last = lanes(job->depth_v - col0 - 16 * (NV - 1));
  for (int r = 0; r < rows; r++) {
    const __m512 d = _mm512_set1_ps(den[r]);
    for (int c = 0; c < NV - 1; c++) _mm512_storeu_ps(out[r] + col0 + 16 * c, _mm512_div_ps(acc[r][c], d));
    _mm512_mask_storeu_ps(out[r] + col0 + 16 * (NV - 1), last, _mm512_div_ps(acc[r][NV - 1], d));
  }
}

/* One head's scratch: a chunk of relu(K) [KEY_CHUNK][depth8] and of V [KEY_CHUNK][width] (zero
 * past depth / depth_v), kv [depth8][width] and ksum [depth8]. */
static size_t head_floats(const struct linear_job *job) {
  return (size_t)KEY_CHUNK * (job->depth8 + job->depth_v16) + (size_t)job->depth8 * (job->depth_v16 + 1);
}

/* Heads [h0, h0 + count) of image b. A unit takes several adjacent heads so that what it reads
 * of a row (and writes of an output row) is one contiguous span: the rows of one head are a few
 * cache lines at a large stride (LiteMLA: two lines 24 KB apart), a pattern the hardware
 * prefetchers miss. */
AVX512 static void linear_unit(const struct linear_job *job, float *scratch, int b, int h0, int count_h) {
  const int keys = job->keys, depth = job->depth, depth8 = job->depth8, depth_v = job->depth_v;
  const int width = job->depth_v16;
  const size_t per_head = head_floats(job);
#define K_CHUNK(hh) (scratch + (size_t)(hh) * per_head)
#define V_CHUNK(hh) (K_CHUNK(hh) + (size_t)KEY_CHUNK * depth8)
#define KV(hh) (V_CHUNK(hh) + (size_t)KEY_CHUNK * width)
#define KSUM(hh) (KV(hh) + (size_t)depth8 * width)
  for (int hh = 0; hh < count_h; hh++)
    for (int j = 0; j < depth8; j++) KSUM(hh)[j] = 0.0f;
  /* kv over chunks of key rows copied row-contiguous (L1 / L2), kv kept between chunks */
  for (int n0 = 0; n0 < keys; n0 += KEY_CHUNK) {
    const int count = keys - n0 < KEY_CHUNK ? keys - n0 : KEY_CHUNK;
    for (int n = 0; n < count; n++) {
      for (int hh = 0; hh < count_h; hh++) {
        const int h = h0 + hh;
        const float *k_row = row_of(&job->k, b, h, n0 + n), *v_row = row_of(&job->v, b, h, n0 + n);
        if (n0 + n + PREFETCH_ROWS < keys) {
          prefetch_row(row_of(&job->k, b, h, n0 + n + PREFETCH_ROWS), depth);
          prefetch_row(row_of(&job->v, b, h, n0 + n + PREFETCH_ROWS), depth_v);
        }
        float *k_packed = K_CHUNK(hh) + (size_t)n * depth8, *v_packed = V_CHUNK(hh) + (size_t)n * width;
        float *ksum = KSUM(hh);
        for (int j = 0; j < depth8; j += 16) {
          const __mmask16 m = lanes(depth - j), stored = lanes(depth8 - j);
          const __m512 kj = _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(m, k_row + j));
          _mm512_mask_storeu_ps(k_packed + j, stored, kj);
          _mm512_mask_storeu_ps(ksum + j, stored, _mm512_add_ps(_mm512_maskz_loadu_ps(stored, ksum + j), kj));
        }
        for (int c = 0; c < width; c += 16)
          _mm512_storeu_ps(v_packed + c, _mm512_maskz_loadu_ps(lanes(depth_v - c), v_row + c));
      }
    }
    /* eight rows of kv at a time (four where a row is wider than 32 columns) */
    const int first = n0 == 0;
    for (int hh = 0; hh < count_h; hh++) {
      const float *k_chunk = K_CHUNK(hh), *v_chunk = V_CHUNK(hh);
      float *kv = KV(hh);
      for (int col0 = 0; col0 < depth_v; col0 += 64) {
        const int nv = (depth_v - col0 + 15) / 16;
        for (int j0 = 0; j0 < depth8; j0 += 8) {
          switch (nv) {
            case 1: key_values(job, k_chunk, v_chunk, count, first, kv, j0, col0, 8, 1); break;
            case 2: key_values(job, k_chunk, v_chunk, count, first, kv, j0, col0, 8, 2); break;
            case 3:
              key_values(job, k_chunk, v_chunk, count, first, kv, j0, col0, 4, 3);
              key_values(job, k_chunk, v_chunk, count, first, kv, j0 + 4, col0, 4, 3);
              break;
            default:
              key_values(job, k_chunk, v_chunk, count, first, kv, j0, col0, 4, 4);
              key_values(job, k_chunk, v_chunk, count, first, kv, j0 + 4, col0, 4, 4);
              break;
          }
        }
      }
    }
  }
  for (int i = 0; i < job->queries; i += 4) {
    const int rows = job->queries - i < 4 ? job->queries - i : 4;
    for (int hh = 0; hh < count_h; hh++) {
      const int h = h0 + hh;
      const float *ksum = KSUM(hh);
      const float *q[4];
      float *out[4];
      float den[4];
      for (int r = 0; r < 4; r++) {
        const int row = i + (r < rows ? r : rows - 1);
        q[r] = row_of(&job->q, b, h, row);
        out[r] = job->out + (((size_t)b * job->queries + row) * job->heads + h) * depth_v;
        if (row + PREFETCH_ROWS < job->queries) prefetch_row(row_of(&job->q, b, h, row + PREFETCH_ROWS), depth);
        __m512 dot = _mm512_setzero_ps();
        for (int j = 0; j < depth; j += 16) {
          const __mmask16 m = lanes(depth - j);
          const __m512 qv = _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(m, q[r] + j));
          dot = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, ksum + j), dot);
        }
        den[r] = _mm512_reduce_add_ps(dot) + job->eps;
      }
      for (int col0 = 0; col0 < depth_v; col0 += 64) {
        switch ((depth_v - col0 + 15) / 16) {
          case 1: linear_rows4(job, q, KV(hh), den, out, rows, col0, 1); break;
          case 2: linear_rows4(job, q, KV(hh), den, out, rows, col0, 2); break;
          case 3: linear_rows4(job, q, KV(hh), den, out, rows, col0, 3); break;
          default: linear_rows4(job, q, KV(hh), den, out, rows, col0, 4); break;
        }
      }
    }
  }
#undef K_CHUNK
#undef V_CHUNK
#undef KV
#undef KSUM
}

static void linear_part(void *arg, int part, int parts) {
  const struct linear_job *job = arg;
  float *scratch = job->scratch + (size_t)part * job->part_floats;
  const int blocks = (job->heads + job->unit_heads - 1) / job->unit_heads; /* per image */
  const long units = (long)job->batch * blocks;
  for (long u = units * part / parts; u < units * (part + 1) / parts; u++) {
    const int h0 = (int)(u % blocks) * job->unit_heads;
    linear_unit(job, scratch, (int)(u / blocks), h0,
                job->heads - h0 < job->unit_heads ? job->heads - h0 : job->unit_heads);
  }
}

int mobileo_relu_linear_attention(int batch, int heads, int queries, int keys, int depth, int depth_v,
                                  mobileo_heads q, mobileo_heads k, mobileo_heads v, float eps, float *out) {
  if (!mobileo_attention_supported() || batch < 1 || heads < 1 || queries < 1 || keys < 1 || depth < 1 ||
      depth_v < 1)
    return -1;
  struct linear_job job = {batch, heads, queries, keys, depth, round_up(depth, 8), depth_v, round_up(depth_v, 16), 1,
                           q, k, v, eps, out, NULL, 0};
  int parts = mobileo_pool_threads(0);
  if ((long)batch * heads * (queries + keys) * depth * depth_v < PARALLEL_MIN_MACS) parts = 1;
  /* up to UNIT_HEADS adjacent heads a unit, leaving four units a thread */
  const long per_thread = (long)batch * heads / (4L * parts);
  job.unit_heads = per_thread < 1 ? 1 : per_thread > UNIT_HEADS ? UNIT_HEADS : (int)per_thread;
  const long units = (long)batch * ((heads + job.unit_heads - 1) / job.unit_heads);
  if (units < parts) parts = (int)units;
  /* per head: a chunk of relu(K) and V, kv and ksum; a whole number of cache lines */
  job.part_floats = (size_t)round_up((int)(head_floats(&job) * job.unit_heads), 16);
  job.scratch = aligned_alloc(64, job.part_floats * parts * sizeof(float));
  if (job.scratch == NULL) return -2;
  if (mobileo_pool_run(linear_part, &job, parts, 1) != 0) linear_part(&job, 0, 1);
  free(job.scratch);
  return 0;
}

#else /* no AVX-512 build: the twins run */
int mobileo_attention_supported(void) { return 0; }

int mobileo_softmax_attention(int batch, int heads, int heads_kv, int queries, int keys, int depth, int depth_v,
                              mobileo_heads q, mobileo_heads k, mobileo_heads v, const float *key_bias, int causal,
                              float scale, float *out) {
  return -1;
}

int mobileo_relu_linear_attention(int batch, int heads, int queries, int keys, int depth, int depth_v,
                                  mobileo_heads q, mobileo_heads k, mobileo_heads v, float eps, float *out) {
  return -1;
}
#endif
