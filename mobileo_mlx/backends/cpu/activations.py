"""Fast float32 activations for MLX's CPU backend: SiLU, sigmoid, ``a * silu(g)``, the
exact (erf) GELU, ``exp(-a)`` and softmax attention.

The CPU forms of the models' modules (backends/cpu/layers.py) call these where the plain
models call MLX's built-ins (``nn.silu``, ``mx.sigmoid``, ``nn.gelu``,
``mx.fast.scaled_dot_product_attention``); tests/test_activations.py holds each to float64
references and to the built-in.

Why the CPU needs its own forms (MLX 0.32, x86-64):

* MLX's CPU ``exp`` / ``sigmoid`` / ``erf`` / ``tanh`` are scalar loops calling libm
  ``fma`` and ``floor`` (no FMA or SSE4.1 in the baseline ISA): ~20-50 M values/s.
* ``mx.compile`` JIT-builds fused elementwise kernels with ``g++ -O3`` and no
  ``-ffast-math``: ``+ - * /``, ``abs``, float<->int casts and integer bit operations
  vectorise (SSE2); ``maximum``, ``minimum`` and ``where`` do not (the NaN checks and
  trapping-math rules keep them scalar and branchy), and one of them makes the whole
  fused loop scalar.
* The fuser cuts a graph deeper than 11 ops into several kernels, and a constant whose
  broadcast lands beyond that depth becomes a stride-0 input, which turns the kernel
  into its slow strided form.

So every CPU activation here is a few separately compiled, shallow, branch-free
kernels over contiguous arrays:

1. ``|x|`` clamped to a bound in the *integer* domain (bit operations on
   ``x.view(int32)``; NaN stays NaN, +-inf and large values become the bound);
2. range reduction of ``exp(-|x|)`` (GELU: of ``exp(-x^2/2)``): ``2**n`` as the bits
   ``(n + 127) << 23`` (viewed back as float32 between kernels, ``view`` is free) and the
   remainder ``r = a - n ln2`` (Cody-Waite, Cephes constants, exact products);
3. ``exp(r)`` by the [3/3] Pade approximant (error < 1e-8 on |r| <= ln2/2), folded into
   the final quotient, and the sign handled arithmetically (``m = 1 + (bits >> 31)``).

Accuracy (float32, tested against float64): relative error < 3e-7 for ``silu``,
``sigmoid`` and ``glu_silu``, < 1e-6 for ``gelu``, wherever the underflowing factor
(sigmoid, Phi) is a normal float; past that the result flushes to (signed) zero, as MLX's
built-ins do. ``inf``/``nan`` as the built-ins and IEEE arithmetic (``silu(-inf)`` and
``gelu(-inf)`` are NaN, as in PyTorch; ``gelu(inf) = inf``). float16/bfloat16 inputs are
computed in float32 and rounded once. Throughput on one x86 core: ~3 ns per value for
``silu``, ~5 ns for ``gelu``, against ~24 and ~45 ns for ``nn.silu`` / ``nn.gelu``.

Where the native kernels serve, float32 ``silu`` and ``glu_silu`` are single graph nodes
(``kernels.primitives.silu`` / ``glu_silu``: this algorithm in C, the same bits, one pass on
every core); the MLX kernels here are their twins.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from mobileo_mlx.backends import kernels_mode, tuning
from mobileo_mlx.backends.cpu import streams
from mobileo_mlx.kernels import primitives

_LOG2E = 1.4426950408889634
# Cody-Waite split of ln 2 (Cephes expf): n * _LN2_HI is exact for |n| < 2**15.
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000


def _float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.int32))


# ---------------------------------------------------------------------------
# CPU kernels: each an independent mx.compile called eagerly (the public functions
# still work inside a traced function, where MLX's fuser regroups the graph)
# ---------------------------------------------------------------------------
def _clamp_abs_bits(bits: mx.array, limit: int) -> mx.array:
    """Bits of min(|x|, bound) from the bits of x, NaN kept (integer ops only)."""
    a = bits & _ABS_MASK
    over = a - limit
    clamped = a - (over & ~(over >> 31))  # min(a, limit)
    nan = (_INF_BITS - a) >> 31  # -1 where a is a NaN pattern, else 0
    return (clamped & ~nan) | (a & nan)


@lru_cache(maxsize=None)
def _clamped_abs(bound: float):
    """fn(bits of x) -> bits of min(|x|, bound)."""
    limit = _float_bits(bound)
    return mx.compile(lambda bits: _clamp_abs_bits(bits, limit))


# Bound of |x| for the logistic family: exp(-88) is below FLT_MIN, so 2**n flushes to 0
# from there on (n = -127 <-> exponent bits 0).
_SIGMOID_BOUND = 88.0


@mx.compile
def _exp_neg_parts(a: mx.array) -> tuple[mx.array, mx.array]:
    """a in [0, 88] (or NaN) -> (bits of 2**n, r) with exp(-a) = 2**n * exp(r), |r| <= ln2/2."""
    bits = (a * -_LOG2E + 127.5).astype(mx.int32) << 23  # (n + 127) << 23, n = round(-a log2 e)
    n = (bits >> 23).astype(mx.float32) - 127.0
    return bits, (-a - n * _LN2_HI) - n * _LN2_LO


def _pade(r: mx.array) -> tuple[mx.array, mx.array]:
    """exp(r) = num / den ([3/3] Pade, |error| < 1e-8 relative for |r| <= ln2/2)."""
    r2 = r * r
    even = 1.0 + r2 * 0.1
    odd = r * (0.5 + r2 * (1.0 / 120.0))
    return even + odd, even - odd


def _logistic(sign_bits: mx.array, r: mx.array, scale: mx.array) -> mx.array:
    """sigmoid(x) from the reduction of exp(-|x|) = scale * exp(r):
    1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, e = scale * num / den."""
    num, den = _pade(r)
    tail = scale * num  # e * den
    positive = 1.0 + (sign_bits >> 31).astype(mx.float32)  # 1 for x >= +0, 0 for x <= -0
    return (positive * den + (1.0 - positive) * tail) / (den + tail)


@mx.compile
def _sigmoid_out(bits, r, scale):
    return _logistic(bits, r, scale)


@mx.compile
def _silu_out(x, bits, r, scale):
    return x * _logistic(bits, r, scale)


@mx.compile
def _glu_out(a, g, bits, r, scale):
    return a * (g * _logistic(bits, r, scale))


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _back(y: mx.array, dtype: mx.Dtype) -> mx.array:
    return y if dtype == mx.float32 else y.astype(dtype)


def _logistic_parts(x32: mx.array):
    bits = x32.view(mx.int32)
    a = _clamped_abs(_SIGMOID_BOUND)(bits).view(mx.float32)
    scale_bits, r = _exp_neg_parts(a)
    return bits, r, scale_bits.view(mx.float32)


# --- chunking ------------------------------------------------------------------
# Each activation writes 3-5 full-size temporaries; large inputs run in chunks whose
# temporaries stay in MLX's buffer cache (tuning.ACTIVATION_CHUNK), on both CPU streams.


def _cache_limit() -> int:
    """MLX's current buffer-cache limit (set_cache_limit returns the previous one; a huge
    limit in between frees nothing)."""
    previous = mx.set_cache_limit(1 << 62)
    mx.set_cache_limit(previous)
    return previous


def _chunked(fn, *arrays: mx.array) -> mx.array:
    """fn over same-shape arrays of more than two chunks, split flat: in chunks of
    ``tuning.ACTIVATION_CHUNK`` values when the whole call's temporaries would not fit MLX's
    buffer cache, else in two halves; the pieces alternate between the two CPU streams and are
    concatenated. fn(*arrays) otherwise, and inside a piece of ``streams.cpu_pieces``."""
    shape, size = arrays[0].shape, arrays[0].size
    chunk_size = tuning.ACTIVATION_CHUNK
    if size <= 2 * chunk_size or any(a.shape != shape for a in arrays) or not streams.may_split():
        return fn(*arrays)
    fits = size * 4 * tuning.ACTIVATION_TEMPORARIES <= _cache_limit()
    chunk = -(-size // 2) if fits else chunk_size
    flats = [a.reshape(-1) for a in arrays]
    parts = streams.cpu_pieces(-(-size // chunk), lambda n: fn(*(f[n * chunk : (n + 1) * chunk] for f in flats)))
    return mx.concatenate(parts).reshape(shape)


def _sigmoid_whole(x: mx.array) -> mx.array:
    x32 = _f32(x)
    return _back(_sigmoid_out(*_logistic_parts(x32)), x.dtype)


def _silu_whole(x: mx.array) -> mx.array:
    x32 = _f32(x)
    return _back(_silu_out(x32, *_logistic_parts(x32)), x.dtype)


def _glu_silu_whole(a: mx.array, g: mx.array) -> mx.array:
    g32 = _f32(g)
    return _back(_glu_out(_f32(a), g32, *_logistic_parts(g32)), a.dtype)


def _native() -> bool:
    """Whether the native kernels serve here (``MOBILEO_MLX_KERNELS=auto``), not inside a piece of
    ``streams.cpu_pieces`` (the node uses every core; the other stream is busy with its piece)."""
    return kernels_mode() == "auto" and streams.may_split()


def sigmoid(x: mx.array) -> mx.array:
    return _chunked(_sigmoid_whole, x)


def silu(x: mx.array) -> mx.array:
    """SiLU: float32 by the native node (``kernels.primitives.silu``, the same bits in one pass
    on every core; faster at every size measured), else the MLX kernels above."""
    if _native() and primitives.silu_supported(x):
        return primitives.silu(x)
    return _chunked(_silu_whole, x)


def glu_silu(a: mx.array, g: mx.array) -> mx.array:
    """a * silu(g) (GLUMBConv's gate); g broadcastable to a. The native node for float32 a and g
    of one shape (``kernels.primitives.glu_silu``, the same bits), else the MLX kernels."""
    if _native() and primitives.glu_silu_supported(a, g):
        return primitives.glu_silu(a, g)
    return _chunked(_glu_silu_whole, a, g)


# --- GELU, exact (erf) form -------------------------------------------------
# gelu(x) = x * Phi(x) with Phi(-a) = erfc(a/sqrt2)/2 = exp(-a^2/2) * erfcx(a/sqrt2)/2, a = |x|.
# * erfcx(a/sqrt2)/2 is smooth and bounded: a degree-9 polynomial in t = 1/(1 + a/(2 sqrt2))
#   (least squares on a <= 13.3, relative error 3e-8 in float64, ~3e-7 evaluated in float32).
# * exp(-a^2/2) keeps full relative accuracy through a split a = a_hi + a_lo, a_hi the top
#   12 significant bits (masked in the integer domain): a_hi^2/2 is exact and is reduced as
#   2**n exp(r), r = (-a_hi^2/2 - n ln2_hi) - n ln2_lo; the small rest
#   exp(-a_lo (a + a_hi)/2) (|argument| < 0.026) is a degree-4 Taylor polynomial.
# * |x| is clamped at 13.28125, where -a_hi^2/2 maps to the exponent bits 0: 2**n = 0.0, so
#   Phi(-a) flushes to 0 exactly where it leaves the float32 range.
_ERFCX_HALF = (-3.58358974e-06, 1.41122322e-01, 1.40450309e-01, 1.25363957e-01, 8.92692682e-02,
               1.10537145e-02, 1.07601864e-01, -2.18526029e-01, 1.31026879e-01, -2.73587168e-02)
_GELU_BOUND = 13.28125
_HI_MASK = ~0xFFF  # keeps the sign, the exponent and the top 11 mantissa bits


@lru_cache(maxsize=None)
def _clamped_abs_split(bound: float):
    """fn(bits of x) -> (bits of a = min(|x|, bound) [NaN kept], bits of a_hi)."""
    limit = _float_bits(bound)

    def fn(bits: mx.array) -> tuple[mx.array, mx.array]:
        a = _clamp_abs_bits(bits, limit)
        return a, a & _HI_MASK

    return mx.compile(fn)


@mx.compile
def _half_erfcx(a: mx.array, a_hi: mx.array) -> mx.array:
    """erfcx(a/sqrt2)/2 * exp(-a_lo (a + a_hi)/2)."""
    t = (2.0 * math.sqrt(2.0)) / ((2.0 * math.sqrt(2.0)) + a)
    c = _ERFCX_HALF
    t2 = t * t
    t4 = t2 * t2
    low = (c[0] + c[1] * t) + (c[2] + c[3] * t) * t2  # Estrin: a shallow graph
    high = (c[4] + c[5] * t) + (c[6] + c[7] * t) * t2
    poly = (low + high * t4) + (c[8] + c[9] * t) * (t4 * t4)
    d = (a - a_hi) * (a + a_hi) * -0.5
    d2 = d * d
    return poly * ((1.0 + d) + d2 * ((0.5 + d * (1.0 / 6.0)) + d2 * (1.0 / 24.0)))


@mx.compile
def _gauss_parts(a_hi: mx.array) -> tuple[mx.array, mx.array]:
    """exp(-a_hi^2/2) = 2**n exp(r): (bits of 2**n, r); a_hi <= 13.28125 keeps n >= -127."""
    square = a_hi * a_hi  # exact (12-bit a_hi)
    bits = (square * (-0.5 * _LOG2E) + 127.5).astype(mx.int32) << 23
    n = (bits >> 23).astype(mx.float32) - 127.0
    return bits, (square * -0.5 - n * _LN2_HI) - n * _LN2_LO


@mx.compile
def _gelu_out(x, bits, half_erfcx, r, scale):
    num, den = _pade(r)
    tail = half_erfcx * (scale * num) / den  # Phi(-|x|)
    positive = 1.0 + (bits >> 31).astype(mx.float32)
    return x * (positive + (1.0 - 2.0 * positive) * tail)  # Phi(x) = 1 - tail for x >= 0


def gelu(x: mx.array) -> mx.array:
    """Exact GELU; the twin of the native kernel (``kernels.primitives.gelu``), bit for bit."""
    return _chunked(_gelu_whole, x)


def _gelu_whole(x: mx.array) -> mx.array:
    x32 = _f32(x)
    bits = x32.view(mx.int32)
    a_bits, hi_bits = _clamped_abs_split(_GELU_BOUND)(bits)
    a, a_hi = a_bits.view(mx.float32), hi_bits.view(mx.float32)
    scale_bits, r = _gauss_parts(a_hi)
    out = _gelu_out(x32, bits, _half_erfcx(a, a_hi), r, scale_bits.view(mx.float32))
    return _back(out, x.dtype)


# --- exp(-a) and softmax attention ---------------------------------------------
@mx.compile
def _exp_neg_out(r, scale):
    num, den = _pade(r)
    return scale * num / den


def exp_neg(a: mx.array) -> mx.array:
    """exp(-a) for a >= 0 (float32; +inf -> 0, NaN -> NaN), relative error < 2e-7."""
    bits = _clamped_abs(_SIGMOID_BOUND)(_f32(a).view(mx.int32))
    scale_bits, r = _exp_neg_parts(bits.view(mx.float32))
    return _exp_neg_out(r, scale_bits.view(mx.float32))


def _attention_core(q, k, v, scale, mask):
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    weights = exp_neg(mx.max(scores, axis=-1, keepdims=True) - scores)
    return (weights @ v) / mx.sum(weights, axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale + mask) v for q [..., N, d], k/v [..., L, d] (the same leading
    axes; heads in them): scores by GEMM, the exponentials by ``exp_neg``, the
    normalisation applied to the [N, d] output instead of the [N, L] weights. Float32
    inside; additive ``mask`` broadcastable to the scores. Long score matrices run a few
    heads (or a block of query rows) at a time, so their temporaries stay in cache (and
    out of fresh pages)."""
    dtype = v.dtype
    *lead, tokens, depth = q.shape
    keys = k.shape[-2]
    q32, k32, v32 = _f32(q), _f32(k), _f32(v)
    mask32 = None if mask is None else mask.astype(mx.float32)
    heads = math.prod(lead)
    step = max(1, tuning.ATTENTION_CHUNK // max(1, tokens * keys))
    rows = tokens if step > 1 else max(1, tuning.ATTENTION_ROWS_CHUNK // max(1, keys))  # query rows per chunk
    if heads <= step and rows >= tokens:
        return _back(_attention_core(q32, k32, v32, scale, mask32), dtype)
    q3 = q32.reshape(heads, tokens, depth)
    k3, v3 = k32.reshape(heads, keys, -1), v32.reshape(heads, keys, -1)
    if mask32 is not None:
        mask32 = mx.broadcast_to(mask32, (*lead, tokens, keys)).reshape(heads, tokens, keys)
    parts = []
    for i in range(0, heads, step):
        h = slice(i, i + step)
        blocks = [
            _attention_core(q3[h, r : r + rows], k3[h], v3[h], scale, None if mask32 is None else mask32[h, r : r + rows])
            for r in range(0, tokens, rows)
        ]
        parts.append(blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1))
    return _back(mx.concatenate(parts, axis=0).reshape(*lead, tokens, v.shape[-1]), dtype)
