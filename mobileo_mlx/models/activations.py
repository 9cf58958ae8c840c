"""Activations: fast and accurate on MLX's CPU backend, MLX's built-ins on GPUs.

``silu``, ``sigmoid``, ``gelu`` (exact, erf form), ``gelu_tanh``, ``glu_silu``
(``a * silu(g)``), ``hardswish`` and ``hardsigmoid``. Each dispatches on
``platform.backend()``: on ``cpu`` the ``*_fast`` forms below run, on Metal and CUDA
the ``*_builtin`` twins (``nn.silu``, ``mx.sigmoid``, ``nn.gelu``, ``nn.gelu_approx``).
The tests hold both forms to each other and to float64 references.

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
``sigmoid`` and ``glu_silu``, < 1e-6 for ``gelu``, < 1e-6 + 2e-7 |2u| for ``gelu_tanh``
(its cubic argument 2u is rounded to float32), wherever the underflowing factor
(sigmoid, Phi) is a normal float; past that the result flushes to (signed) zero, as MLX's
built-ins do. ``inf``/``nan`` as the built-ins and IEEE arithmetic (``silu(-inf)`` and
``gelu(-inf)`` are NaN, as in PyTorch; ``gelu(inf) = inf``). float16/bfloat16 inputs are
computed in float32 and rounded once. Throughput on one x86 core: ~3 ns per value for
``silu``, ~5 ns for ``gelu``, against ~24 and ~45 ns for ``nn.silu`` / ``nn.gelu``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mobileo_mlx import platform
from mobileo_mlx.kernels import gelu as native_gelu

__all__ = [
    "silu", "sigmoid", "gelu", "gelu_tanh", "glu_silu", "hardswish", "hardsigmoid",
    "silu_fast", "sigmoid_fast", "gelu_fast", "gelu_tanh_fast", "glu_silu_fast",
    "silu_builtin", "sigmoid_builtin", "gelu_builtin", "gelu_tanh_builtin", "glu_silu_builtin",
    "softmax", "softmax_fast", "softmax_builtin", "exp_neg_fast",
    "scaled_dot_product_attention", "attention_fast", "attention_builtin",
    "use_fast",
]

_LOG2E = 1.4426950408889634
# Cody-Waite split of ln 2 (Cephes expf): n * _LN2_HI is exact for |n| < 2**15.
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000


def _float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.int32))


def use_fast() -> bool:
    """True where the CPU forms run (MLX's default device is the CPU)."""
    return platform.backend() == "cpu"


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
# Each CPU activation writes 3-5 full-size temporaries. MLX's CPU buffer cache is 32 MB
# by default: past that every temporary is fresh memory, page-faulted at ~0.3 ms/MB
# (more than the arithmetic). Large inputs therefore run in 64K-element chunks (their
# temporaries are recycled and stay in cache) unless the cache limit holds them anyway.
_CHUNK = 1 << 16
_TEMPORARIES = 6  # full-size float32 arrays alive in the longest kernel chain


def _cache_limit() -> int:
    """MLX's current buffer-cache limit (set_cache_limit returns the previous one; a huge
    limit in between frees nothing)."""
    previous = mx.set_cache_limit(1 << 62)
    mx.set_cache_limit(previous)
    return previous


def _chunked(fn, *arrays: mx.array) -> mx.array:
    """fn over same-shape arrays of more than two chunks, split flat: in 64K-element chunks
    when the whole call's temporaries would not fit MLX's buffer cache, else in two halves;
    the pieces alternate between two CPU streams and are concatenated. fn(*arrays) otherwise,
    and inside a piece of ``platform.cpu_pieces`` (already on one of the two streams)."""
    shape, size = arrays[0].shape, arrays[0].size
    if size <= 2 * _CHUNK or any(a.shape != shape for a in arrays) or not platform.may_split_over_streams():
        return fn(*arrays)
    # When the whole call's temporaries fit the cache: two halves, else 64K chunks; either
    # way alternately on a second CPU stream, which MLX runs on its own thread (the
    # element-wise work gets two cores instead of one).
    chunk = -(-size // 2) if size * 4 * _TEMPORARIES <= _cache_limit() else _CHUNK
    flats = [a.reshape(-1) for a in arrays]
    parts = platform.cpu_pieces(-(-size // chunk), lambda n: fn(*(f[n * chunk : (n + 1) * chunk] for f in flats)))
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


def sigmoid_fast(x: mx.array) -> mx.array:
    return _chunked(_sigmoid_whole, x)


def silu_fast(x: mx.array) -> mx.array:
    return _chunked(_silu_whole, x)


def glu_silu_fast(a: mx.array, g: mx.array) -> mx.array:
    """a * silu(g) (GLUMBConv's gate); g broadcastable to a."""
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


def gelu_fast(x: mx.array) -> mx.array:
    return _chunked(_gelu_whole, x)


def _gelu_whole(x: mx.array) -> mx.array:
    x32 = _f32(x)
    bits = x32.view(mx.int32)
    a_bits, hi_bits = _clamped_abs_split(_GELU_BOUND)(bits)
    a, a_hi = a_bits.view(mx.float32), hi_bits.view(mx.float32)
    scale_bits, r = _gauss_parts(a_hi)
    out = _gelu_out(x32, bits, _half_erfcx(a, a_hi), r, scale_bits.view(mx.float32))
    return _back(out, x.dtype)


# --- GELU, tanh form: 0.5 x (1 + tanh(u)) = x * sigmoid(2u) --------------------
_TANH_C1 = 2.0 * math.sqrt(2.0 / math.pi)
_TANH_C3 = _TANH_C1 * 0.044715


@mx.compile
def _gelu_tanh_arg(x):
    return x * (_TANH_C1 + _TANH_C3 * (x * x))  # 2u


def gelu_tanh_fast(x: mx.array) -> mx.array:
    x32 = _f32(x)
    w = _gelu_tanh_arg(x32)
    return _back(_silu_out(x32, *_logistic_parts(w)), x.dtype)


# --- exp(-a), softmax and softmax attention ------------------------------------
@mx.compile
def _exp_neg_out(r, scale):
    num, den = _pade(r)
    return scale * num / den


def exp_neg_fast(a: mx.array) -> mx.array:
    """exp(-a) for a >= 0 (float32; +inf -> 0, NaN -> NaN), relative error < 2e-7."""
    bits = _clamped_abs(_SIGMOID_BOUND)(_f32(a).view(mx.int32))
    scale_bits, r = _exp_neg_parts(bits.view(mx.float32))
    return _exp_neg_out(r, scale_bits.view(mx.float32))


def softmax_fast(x: mx.array, axis: int = -1) -> mx.array:
    x32 = _f32(x)
    e = exp_neg_fast(mx.max(x32, axis=axis, keepdims=True) - x32)
    return _back(e / mx.sum(e, axis=axis, keepdims=True), x.dtype)


# Score elements per chunk of heads (4 MB temporaries: they come from MLX's buffer cache
# instead of fresh, page-faulted memory); when a chunk would hold a single head, its query
# rows run in blocks of _ATTENTION_ROWS_CHUNK scores instead: FastViTHD's 12 x 1024 x 1024
# attention takes 80-111 ms in whole heads, 61 ms in 512-row blocks (its vision tower at
# 1024²: ~0.35 s faster).
_ATTENTION_CHUNK = 1 << 20
_ATTENTION_ROWS_CHUNK = 1 << 19


def _attention_core(q, k, v, scale, mask):
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    weights = exp_neg_fast(mx.max(scores, axis=-1, keepdims=True) - scores)
    return (weights @ v) / mx.sum(weights, axis=-1, keepdims=True)


def attention_fast(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale + mask) v for q [..., N, d], k/v [..., L, d] (the same leading
    axes; heads in them): scores by GEMM, the exponentials by ``exp_neg_fast``, the
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
    step = max(1, _ATTENTION_CHUNK // max(1, tokens * keys))
    rows = tokens if step > 1 else max(1, _ATTENTION_ROWS_CHUNK // max(1, keys))  # query rows per chunk
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


# ---------------------------------------------------------------------------
# Built-in twins (GPUs)
# ---------------------------------------------------------------------------
def silu_builtin(x: mx.array) -> mx.array:
    return nn.silu(x)


def sigmoid_builtin(x: mx.array) -> mx.array:
    return mx.sigmoid(x)


def gelu_builtin(x: mx.array) -> mx.array:
    return nn.gelu(x)


def gelu_tanh_builtin(x: mx.array) -> mx.array:
    return nn.gelu_approx(x)


@mx.compile
def glu_silu_builtin(a: mx.array, g: mx.array) -> mx.array:
    return a * nn.silu(g)


def softmax_builtin(x: mx.array, axis: int = -1) -> mx.array:
    return mx.softmax(x, axis=axis, precise=True)


def attention_builtin(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------
def silu(x: mx.array) -> mx.array:
    return silu_fast(x) if use_fast() else silu_builtin(x)


def sigmoid(x: mx.array) -> mx.array:
    return sigmoid_fast(x) if use_fast() else sigmoid_builtin(x)


def gelu(x: mx.array, overwrite: bool = False) -> mx.array:
    """Exact (erf) GELU, torch ``nn.GELU()``. ``overwrite=True``: ``x`` is a temporary the
    caller hands over, so on the CPU the native kernel (``kernels.gelu``: the same algorithm,
    bit for bit, vectorised on every core) may write the result into its buffer."""
    if not use_fast():
        return gelu_builtin(x)
    if overwrite:
        return native_gelu.gelu_in_place(x, gelu_fast)
    return gelu_fast(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (torch ``approximate="tanh"``)."""
    return gelu_tanh_fast(x) if use_fast() else gelu_tanh_builtin(x)


def glu_silu(a: mx.array, g: mx.array) -> mx.array:
    """a * silu(g)."""
    return glu_silu_fast(a, g) if use_fast() else glu_silu_builtin(a, g)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    return softmax_fast(x, axis) if use_fast() else softmax_builtin(x, axis)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                                 mask: mx.array | None = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` (additive mask) with a fast CPU form: MLX's
    CPU fallback evaluates the softmax with its scalar ``exp``."""
    return attention_fast(q, k, v, scale, mask) if use_fast() else attention_builtin(q, k, v, scale, mask)


# Piecewise-linear activations: plain arithmetic, the same on every backend (torch's
# formulas and operation order).
@mx.compile
def hardsigmoid(x: mx.array) -> mx.array:
    """relu6(x + 3) / 6."""
    return mx.clip(x + 3, 0, 6) / 6


@mx.compile
def hardswish(x: mx.array) -> mx.array:
    """x * relu6(x + 3) / 6."""
    return x * mx.clip(x + 3, 0, 6) / 6
