"""The CPU backend's fast activations (``backends.cpu.activations``) against float64 references
over wide ranges, against MLX's built-ins (what the plain models call), special values, half
precision, chunking over the two streams, and the fast softmax attention."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mobileo_mlx.backends.cpu import activations as act

FLT_MIN = 2.0**-126


def _sigmoid64(x):
    return torch.sigmoid(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _gelu64(x):  # erfc form: no cancellation in the tail (torch's own gelu has it)
    t = torch.as_tensor(x, dtype=torch.float64)
    return (t * 0.5 * torch.special.erfc(-t / math.sqrt(2))).numpy()


# name -> (fast, MLX's built-in, float64 reference, the argument of the underflowing factor)
CASES = {
    "sigmoid": (act.sigmoid, mx.sigmoid, _sigmoid64, lambda x: x),
    "silu": (act.silu, nn.silu, lambda x: x * _sigmoid64(x), lambda x: x),
    "gelu": (act.gelu, nn.gelu, _gelu64, lambda x: x),
}
# Where the underflowing factor (sigmoid(w), Phi(x)) is still a normal float32.
NORMAL_FROM = {"sigmoid": -87.3, "silu": -87.3, "gelu": -13.0}
RELATIVE = {"sigmoid": lambda w: 5e-7, "silu": lambda w: 5e-7, "gelu": lambda w: 1e-6}


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    tiny = np.geomspace(1e-38, 1.0, 20_001)
    return np.concatenate([
        np.linspace(-100, 100, 400_001), rng.standard_normal(200_000) * 4,
        tiny, -tiny, np.geomspace(1.0, 3e38, 2_001), -np.geomspace(1.0, 3e38, 2_001),
    ]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_form_is_accurate_in_float32(name):
    fast, _, reference, argument = CASES[name]
    x = _inputs()
    x64 = x.astype(np.float64)
    expected = reference(x64)
    actual = np.array(fast(mx.array(x)), dtype=np.float64)
    normal = (argument(x64) >= NORMAL_FROM[name]) & (np.abs(expected) >= FLT_MIN)
    rel = np.abs(actual - expected)[normal] / np.abs(expected)[normal]
    excess = rel / RELATIVE[name](argument(x64)[normal])
    assert excess.max() < 1, (name, rel.max(), x[normal][excess.argmax()])
    # Below that the factor underflows: flushed to zero, never larger than FLT_MIN * |x|.
    rest = ~normal
    assert np.all(np.abs(actual - expected)[rest] <= FLT_MIN * np.maximum(np.abs(x64[rest]), 1))


def test_glu_silu_is_a_times_silu_g():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(100_000).astype(np.float32) * 3
    g = np.concatenate([np.linspace(-87, 90, 50_000), rng.standard_normal(50_000) * 5]).astype(np.float32)
    expected = a.astype(np.float64) * g * _sigmoid64(g.astype(np.float64))
    actual = np.array(act.glu_silu(mx.array(a), mx.array(g)), dtype=np.float64)
    keep = np.abs(expected) >= FLT_MIN
    assert (np.abs(actual - expected)[keep] / np.abs(expected)[keep]).max() < 5e-7
    twin = np.array(mx.array(a) * nn.silu(mx.array(g)), dtype=np.float64)
    np.testing.assert_allclose(actual, twin, rtol=1e-5, atol=1e-30)


SPECIAL = [-np.inf, -3e38, -1e30, -1e4, -100.0, -88.5, -88.0, -87.5, -20.0, -13.5, -13.0,
           -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 13.0, 20.0, 88.0, 100.0,
           1e4, 1e30, 3e38, np.inf, np.nan]


@pytest.mark.parametrize("name", sorted(CASES))
def test_special_values(name):
    fast, builtin, reference, _ = CASES[name]
    x = mx.array(np.array(SPECIAL, dtype=np.float32))
    x64 = np.array(SPECIAL, dtype=np.float32).astype(np.float64)
    actual = np.array(fast(x), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference(x64)
    # NaN exactly where MLX's built-in and the IEEE float64 formula give NaN
    # (silu(-inf) = gelu(-inf) = nan, as in PyTorch), inf where the function is inf ...
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(np.array(builtin(x))))
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(actual), np.isinf(expected))
    # ... and the finite values right to the top of the range (the built-in gelu overflows
    # at 3e38), with the signs of the limits; tails below FLT_MIN * |x| flush to zero.
    finite = np.isfinite(expected)
    err = np.abs(actual[finite] - expected[finite])
    assert np.all(err <= 1e-6 * np.abs(expected[finite]) + FLT_MIN * np.maximum(np.abs(x64[finite]), 1))
    assert np.all(np.signbit(actual[finite]) == np.signbit(expected[finite]))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_half_precision_inputs(name, dtype):
    fast, builtin, reference, _ = CASES[name]
    values = np.concatenate([np.linspace(-20, 20, 4001), SPECIAL[1:-1]]).astype(np.float32)
    x = mx.array(values).astype(dtype)
    actual = fast(x)
    assert actual.dtype == dtype
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference(x64)
        got = np.array(actual.astype(mx.float32), dtype=np.float64)
    # One rounding to the half type: within half an ulp of it (2^-11 fp16, 2^-8 bf16) plus
    # what the half type cannot represent (overflow to inf, subnormal flushes).
    ulp = 2.0**-10 if dtype == mx.float16 else 2.0**-7
    tiny = 2.0**-24 if dtype == mx.float16 else 0.0
    finite = np.isfinite(expected) & np.isfinite(got)
    err = np.abs(got[finite] - expected[finite])
    flush = FLT_MIN * np.maximum(np.abs(x64[finite]), 1)  # as in float32
    assert np.all(err <= ulp * np.abs(expected)[finite] + tiny + flush), name
    np.testing.assert_array_equal(np.isnan(got), np.isnan(np.array(builtin(x).astype(mx.float32))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_and_builtin_twins_agree_on_typical_activations(name):
    fast, builtin, _, _ = CASES[name]
    x = mx.random.normal((4, 64, 96), key=mx.random.key(3)) * 4
    np.testing.assert_allclose(np.array(fast(x)), np.array(builtin(x)), rtol=2e-5, atol=1e-6)


def test_shapes_layouts_and_tracing():
    x = mx.random.normal((6, 10), key=mx.random.key(4))
    for fast, builtin in [(act.silu, nn.silu), (act.gelu, nn.gelu)]:
        assert fast(mx.array(0.5)).shape == ()
        assert fast(mx.zeros((0, 3))).shape == (0, 3)
        np.testing.assert_allclose(np.array(fast(x.T)), np.array(builtin(x.T)), rtol=1e-5, atol=1e-7)
        traced = mx.compile(lambda y: fast(y) * 2)
        np.testing.assert_allclose(np.array(traced(x)), 2 * np.array(fast(x)), rtol=1e-6, atol=1e-7)
    gate = x[:1]  # broadcast gate
    np.testing.assert_allclose(
        np.array(act.glu_silu(x, gate)), np.array(x * nn.silu(gate)), rtol=1e-5, atol=1e-7
    )


def test_large_inputs_run_in_chunks_with_identical_results(monkeypatch):
    """Large inputs run in 64K chunks (or two halves when the cache holds them), alternately
    on two CPU streams: the values are those of one whole-array pass, bit for bit."""
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")  # the MLX kernels (float32 SiLU is otherwise one node)
    x = mx.random.normal((3, 700, 1001), key=mx.random.key(6)) * 6  # > 2 chunks, ragged tail
    g = mx.random.normal((3, 700, 1001), key=mx.random.key(7))
    whole = [act._silu_whole(x), act._sigmoid_whole(x), act._gelu_whole(x), act._glu_silu_whole(x, g)]
    for limit in (0, 1 << 62):  # chunks / halves
        monkeypatch.setattr(act, "_cache_limit", lambda: limit)
        split = [act.silu(x), act.sigmoid(x), act.gelu(x), act.glu_silu(x, g)]
        for a, b in zip(split, whole):
            assert a.shape == x.shape
            np.testing.assert_array_equal(np.array(a), np.array(b))
    monkeypatch.undo()
    assert act._cache_limit() == act._cache_limit()  # reading the limit leaves it unchanged


def test_exp_neg():
    a = mx.array(np.array([0.0, 1e-30, 0.5, 1.0, 20.0, 87.0, 88.0, 100.0, np.inf, np.nan], dtype=np.float32))
    got = np.array(act.exp_neg(a), dtype=np.float64)
    ref = np.exp(-np.array(a, dtype=np.float64))
    ok = ref > FLT_MIN
    assert np.all(np.abs(got - ref)[ok] <= 3e-7 * ref[ok])
    assert np.all(got[~ok & ~np.isnan(ref)] <= FLT_MIN) and np.isnan(got[-1])


@pytest.mark.parametrize("shape", [(2, 16, 256, 40, 72), (1, 24, 300, 300, 32), (2, 3, 5, 9, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa(shape, masked):
    batch, heads, tokens, keys, depth = shape
    q = mx.random.normal((batch, heads, tokens, depth), key=mx.random.key(1)) * 2
    k = mx.random.normal((batch, heads, keys, depth), key=mx.random.key(2)) * 2
    v = mx.random.normal((batch, heads, keys, depth), key=mx.random.key(3))
    mask = None
    if masked:  # diffusers-style additive key mask [B, 1, 1, L]
        keep = np.ones((batch, keys), dtype=np.float32)
        keep[0, keys // 2 :] = 0
        mask = mx.array((1 - keep) * -10000.0)[:, None, None, :]
    scale = depth**-0.5
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    np.testing.assert_allclose(np.array(act.attention(q, k, v, scale, mask)), np.array(expected),
                               rtol=1e-5, atol=2e-6)
    half = act.attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale, mask)
    assert half.dtype == mx.float16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), np.array(expected), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_in_blocks_of_query_rows_matches_sdpa(monkeypatch, masked):
    # A head whose scores exceed the chunk runs in blocks of query rows (10 rows: 3+3+3+1).
    monkeypatch.setattr(act.tuning, "ATTENTION_CHUNK", 64)
    monkeypatch.setattr(act.tuning, "ATTENTION_ROWS_CHUNK", 27)
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)) for i, shape in
               enumerate([(2, 3, 10, 8), (2, 3, 9, 8), (2, 3, 9, 8)]))
    mask = mx.array(np.where(np.arange(9) < 5, 0.0, -10000.0).astype(np.float32))[None, None, None] if masked else None
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask=mask)
    np.testing.assert_allclose(np.array(act.attention(q, k, v, 8**-0.5, mask)), np.array(expected),
                               rtol=1e-5, atol=2e-6)
