"""The attention nodes (kernels.primitives.softmax_attention / relu_linear_attention,
native/attention.c) against their twins and float64, as graph nodes (lazy, compiled, on two
streams, inputs untouched, transformations through the plain formula), the layouts they read
and write (head views in place, the merged layout out), and the CPU forms that take them:
SANA's cross-attention, its ReLU linear attention and the DC-AE's LiteMLA."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mobileo_mlx import backends
from mobileo_mlx.backends import tuning
from mobileo_mlx.backends.cpu import activations, layers
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.models import common, dcae, fastvit, sana
from tests.test_primitives import built_lazily, relative_error, same_bits

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(not prim.attention_supported(),
                       reason=f"attention nodes unavailable: {prim.unavailable_reason() or 'this CPU has no AVX-512'}"),
]

SOFTMAX, LINEAR = "MobileoSoftmaxAttention", "MobileoReluLinearAttention"


def graph(*outputs) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue()


def has(name: str, *outputs) -> bool:
    return f'"{name}"' in graph(*outputs)


def heads(merged: mx.array, count: int) -> mx.array:
    """[B, N, H*d] -> the [B, H, N, d] view the models pass (sana._split_heads)."""
    return sana._split_heads(merged, count)


def merged_inputs(batch, rows, width, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((batch, rows, width)) * spread).astype(np.float32))


def key_bias(batch, keys, kind, seed=0):
    """None, a padded caption's mask (-10000 on some keys), or one image with every key masked."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    keep = (rng.random((batch, keys)) > 0.3).astype(np.float32)
    keep[:, 0] = 1
    if kind == "all masked":
        keep[0] = 0
    return mx.array(((1 - keep) * sana.MASKED_KEY_BIAS)[:, None, None, :])


def softmax_exact(q, k, v, scale, bias) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = q @ k.swapaxes(-1, -2) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ v


def linear_exact(q, k, v, eps) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    q, k = np.maximum(q, 0), np.maximum(k, 0)
    return (q @ (k.swapaxes(-1, -2) @ v)) / ((q * k.sum(-2, keepdims=True)).sum(-1, keepdims=True) + eps)


# ------------------------------------------------------------------------------ softmax
@pytest.mark.parametrize("batch, rows, head_count, depth, keys, bias", [
    (2, 256, 16, 72, 64, "padded"),  # the DiT's cross-attention, a CFG pair
    (1, 256, 16, 72, 7, None),
    (2, 37, 16, 72, 300, "padded"),
    (1, 5, 3, 20, 1, None),  # one key
    (2, 9, 2, 32, 7, "padded"),  # the demo model's heads
    (1, 70, 1, 17, 300, None),  # odd depth: masked tails everywhere
    (2, 3, 5, 100, 33, "padded"),  # d_v past 96 columns: two column blocks
    # row groups of eight and of four, key and column blocks of every size they split into
    (2, 13, 3, 72, 79, "padded"),  # 8 + 5 rows (the last group repeats its last row): blocks of 3 + 2 vectors
    (1, 4, 2, 72, 300, "padded"),  # one group of four: key blocks of 5, 5, 5, 4 vectors
    (1, 12, 2, 100, 150, None),  # 8 + 4 rows; d_v of 7 vectors: 3 + 2 + 2 (eight rows), 4 + 3 (four)
    (1, 24, 4, 32, 256, None),  # FastViT's d = 32: K^T tiles of 16 x 16, two column vectors
])
def test_softmax_attention_against_float64_and_its_twins(batch, rows, head_count, depth, keys, bias):
    q = heads(merged_inputs(batch, rows, head_count * depth, seed=rows), head_count)
    k = heads(merged_inputs(batch, keys, head_count * depth, seed=keys + 1), head_count)
    v = heads(merged_inputs(batch, keys, head_count * depth, seed=keys + 2), head_count)
    mask = key_bias(batch, keys, bias, seed=keys)
    scale = depth**-0.5
    out = prim.softmax_attention(q, k, v, scale, mask)
    assert has(SOFTMAX, out) and out.shape == (batch, head_count, rows, depth)
    exact = softmax_exact(q, k, v, scale, mask)
    assert relative_error(out, exact) < 1.5e-6
    # the plain formula, and the CPU form's fast-softmax MLX graph it replaces
    assert relative_error(out, prim.softmax_attention_reference(q, k, v, scale, mask)) < 3e-6
    assert relative_error(out, activations.attention(q, k, v, scale, mask)) < 3e-6


def test_softmax_attention_with_large_scores_and_masked_images():
    q = heads(merged_inputs(2, 100, 16 * 72, seed=1, spread=10.0), 16)  # scores of magnitude ~100
    k, v = (heads(merged_inputs(2, 64, 16 * 72, seed=s), 16) for s in (2, 3))
    scale = 72**-0.5
    mask = key_bias(2, 64, "padded")
    out = prim.softmax_attention(q, k, v, scale, mask)
    # float32 scores carry ~1e-7 of their magnitude: the same bound for every float32 form
    assert relative_error(out, softmax_exact(q, k, v, scale, mask)) < 1e-5
    assert relative_error(activations.attention(q, k, v, scale, mask), softmax_exact(q, k, v, scale, mask)) < 1e-5
    # an image whose keys all carry -10000: its scores lose their low bits when the bias is
    # added, in every float32 form alike
    masked = key_bias(2, 64, "all masked")
    out = prim.softmax_attention(q[:, :, :20] / 10, k, v, scale, masked)
    exact = softmax_exact(q[:, :, :20] / 10, k, v, scale, masked)
    assert relative_error(out, exact) < 1e-3
    assert relative_error(activations.attention(q[:, :, :20] / 10, k, v, scale, masked), exact) < 1e-3
    assert relative_error(out[1], exact[1]) < 1.5e-6


def test_softmax_attention_special_values():
    q, k, v = (mx.random.normal((1, 2, 8, 16), key=mx.random.key(i)) for i in range(3))
    every_key_minus_inf = mx.full((1, 1, 1, 8), -np.inf)
    assert np.isnan(np.array(prim.softmax_attention(q, k, v, 0.25, every_key_minus_inf))).all()  # as the twin
    assert np.isnan(np.array(activations.attention(q, k, v, 0.25, every_key_minus_inf))).all()
    one_key_minus_inf = mx.array(np.where(np.arange(8) == 3, -np.inf, 0).astype(np.float32))[None, None, None]
    out = prim.softmax_attention(q, k, v, 0.25, one_key_minus_inf)
    assert relative_error(out, softmax_exact(q, k, v, 0.25, one_key_minus_inf)) < 1.5e-6
    poisoned = np.array(q)
    poisoned[0, 1, 5, 2] = np.nan
    out = np.array(prim.softmax_attention(mx.array(poisoned), k, v, 0.25))
    assert np.isnan(out[0, 1, 5]).all() and not np.isnan(np.delete(out[0, 1], 5, axis=0)).any()
    assert not np.isnan(out[0, 0]).any()


# ------------------------------------------------------------- causal, grouped-query heads
def grouped_causal_exact(q, k, v, scale, bias=None, causal=False) -> np.ndarray:
    """float64 softmax attention with k, v repeated to q's heads and mlx-lm's causal mask (the
    last query row is the last key)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    if causal:
        queries, keys = q.shape[2], k.shape[2]
        scores = np.where(np.arange(keys - queries, keys)[:, None] >= np.arange(keys)[None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ v


@pytest.mark.parametrize("batch, head_count, kv_heads, rows, keys, depth, causal, bias", [
    (1, 14, 2, 300, 300, 64, True, None),  # the LM's prefill: 7 query heads a KV head
    (1, 14, 2, 5, 5, 64, True, None),
    (1, 14, 2, 1, 1, 64, True, None),
    (2, 4, 4, 37, 100, 24, True, None),  # a prompt cache's offset of 63 keys; group 1
    (1, 6, 3, 1, 9, 16, True, None),  # one query row after 8 cached keys
    (2, 6, 3, 70, 70, 17, True, "padded"),  # group 2, odd depth, a key bias too
    (1, 7, 1, 20, 33, 32, False, None),  # grouped, not causal
    (2, 4, 2, 9, 300, 100, True, "padded"),  # d_v past 96 columns
])
def test_softmax_attention_causal_and_grouped_against_float64_and_its_twin(batch, head_count, kv_heads, rows, keys,
                                                                            depth, causal, bias):
    q = mx.random.normal((batch, head_count, rows, depth), key=mx.random.key(rows))
    k = mx.random.normal((batch, kv_heads, keys, depth), key=mx.random.key(keys + 1))
    v = mx.random.normal((batch, kv_heads, keys, depth), key=mx.random.key(keys + 2))
    mask = key_bias(batch, keys, bias, seed=keys)
    scale = depth**-0.5
    out = prim.softmax_attention(q, k, v, scale, mask, causal=causal)
    assert has(SOFTMAX, out) and out.shape == (batch, head_count, rows, depth)
    exact = grouped_causal_exact(q, k, v, scale, mask, causal)
    assert relative_error(out, exact) < 1.5e-6
    assert relative_error(out, prim.softmax_attention_reference(q, k, v, scale, mask, causal)) < 3e-6
    # the same as the node on repeated KV heads and an explicit causal bias per key block: its
    # rows see exactly their keys
    if causal and bias is None:
        group = head_count // kv_heads
        repeated = [mx.repeat(a, group, axis=1) for a in (k, v)]
        for i in (0, rows // 2, rows - 1):
            row = prim.softmax_attention(q[:, :, i:i + 1], *(a[:, :, :keys - rows + i + 1] for a in repeated), scale)
            assert relative_error(out[:, :, i:i + 1], row) < 3e-6


def test_causal_and_grouped_results_are_the_plain_calls_bit_for_bit_where_nothing_is_masked():
    """Non-causal calls on grouped heads equal the call on the repeated heads bit for bit (the
    same sums in the same order), and a causal call with one query row equals the plain call."""
    q = mx.random.normal((2, 6, 40, 32), key=mx.random.key(1))
    k, v = (mx.random.normal((2, 2, 50, 32), key=mx.random.key(s)) for s in (2, 3))
    repeated = [mx.repeat(a, 3, axis=1) for a in (k, v)]
    assert same_bits(prim.softmax_attention(q, k, v, 0.2), prim.softmax_attention(q, *repeated, 0.2))
    last = q[:, :, -1:]
    assert same_bits(prim.softmax_attention(last, k, v, 0.2, causal=True), prim.softmax_attention(last, k, v, 0.2))


def test_the_causal_node_is_a_graph_node():
    q = mx.random.normal((1, 4, 20, 16), key=mx.random.key(1))
    k, v = (mx.random.normal((1, 2, 30, 16), key=mx.random.key(s)) for s in (2, 3))
    built_lazily(lambda: [q, k, v], lambda *x: prim.softmax_attention(*x, 0.25, causal=True))
    causal = lambda *x: prim.softmax_attention(*x, 0.25, causal=True)  # noqa: E731
    plain = lambda *x: prim.softmax_attention_reference(*x, 0.25, causal=True)  # noqa: E731
    assert not same_bits(causal(q, k, v), prim.softmax_attention(q, k, v, 0.25))  # not one node for both
    compiled = mx.compile(lambda *x: causal(*x) * 2.0)
    assert same_bits(compiled(q, k, v), causal(q, k, v) * 2.0)
    grads = mx.grad(lambda *x: (causal(*x) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    wants = mx.grad(lambda *x: (plain(*x) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(relative_error(g, w) < 1e-5 for g, w in zip(grads, wants))
    batched = mx.vmap(lambda a: causal(a[None], k, v)[0])(q)
    assert relative_error(batched, plain(q, k, v)) < 1e-5


# ------------------------------------------------------------------------------ ReLU linear
@pytest.mark.parametrize("batch, rows, keys, head_count, depth, depth_v", [
    (2, 256, 256, 36, 32, 32),  # the DiT's attn1, a CFG pair
    (1, 256, 256, 36, 32, 32),
    (2, 7, 300, 3, 20, 20),  # more keys than queries; odd depth
    (1, 300, 7, 5, 9, 9),
    (1, 4, 3, 1, 1, 1),  # d = d_v = 1
    (2, 70, 130, 2, 17, 72),  # d_v of 4.5 vectors: kv four rows at a time
    (1, 33, 65, 2, 40, 130),  # two column blocks; a second chunk of 64 key rows
])
def test_relu_linear_attention_against_float64_and_its_twin(batch, rows, keys, head_count, depth, depth_v):
    q = mx.random.normal((batch, head_count, rows, depth), key=mx.random.key(rows))
    k = mx.random.normal((batch, head_count, keys, depth), key=mx.random.key(keys + 1))
    v = mx.random.normal((batch, head_count, keys, depth_v), key=mx.random.key(keys + 2))
    out = prim.relu_linear_attention(q, k, v, 1e-15)
    assert has(LINEAR, out) and out.shape == (batch, head_count, rows, depth_v)
    exact = linear_exact(q, k, v, 1e-15)
    assert relative_error(out, exact) < 1e-6
    assert relative_error(out, common.relu_linear_attention(q, k, v, 1e-15)) < 1e-6  # the twin
    assert relative_error(out, prim.relu_linear_attention_reference(q, k, v, 1e-15)) < 1e-6


def test_relu_linear_attention_of_the_dcae_interleaved_layout():
    """LiteMLA's q, k, v: the thirds of interleaved [B, N, G, 3d] groups, read in place."""
    batch, side, groups, depth = 1, 48, 8, 32
    qkv = mx.random.normal((batch, side * side, groups, 3 * depth), key=mx.random.key(4)).transpose(0, 2, 1, 3)
    q, k, v = mx.split(qkv, 3, axis=-1)  # as the model takes them: views
    out = prim.relu_linear_attention(q, k, v, 1e-15)
    exact = linear_exact(q, k, v, 1e-15)
    assert relative_error(out, exact) < 1e-6
    assert relative_error(out, common.relu_linear_attention(q, k, v, 1e-15)) < 1e-6
    poisoned = np.array(q)
    poisoned[0, 3, 7, 5] = np.nan
    out = np.array(prim.relu_linear_attention(mx.array(poisoned), k, v, 1e-15))
    twin = np.array(common.relu_linear_attention(mx.array(poisoned), k, v, 1e-15))
    assert np.array_equal(np.isnan(out), np.isnan(twin)) and np.isnan(out[0, 3, 7]).all()  # that row only
    # all-zero rows of relu(q): 0 / eps
    zero_rows = mx.concatenate([mx.full((1, groups, 5, depth), -1.0), q[:, :, 5:]], axis=2)
    assert not np.array(prim.relu_linear_attention(zero_rows, k, v, 1e-15))[:, :, :5].any()


# ------------------------------------------------------------------------------ layouts
def test_the_nodes_read_any_layout_and_write_the_merged_one():
    batch, rows, head_count, depth, keys = 2, 40, 4, 24, 30
    q_merged = merged_inputs(batch, rows, head_count * depth, seed=1)
    k_merged, v_merged = (merged_inputs(batch, keys, head_count * depth, seed=s) for s in (2, 3))
    views = [heads(a, head_count) for a in (q_merged, k_merged, v_merged)]
    contiguous = [mx.contiguous(a) for a in views]
    # a layout with no unit stride along d: gathered when the kernel runs
    strided = [mx.contiguous(a.swapaxes(-1, -2)).swapaxes(-1, -2) for a in views]
    for make in (lambda q, k, v: prim.softmax_attention(q, k, v, 0.2),
                 lambda q, k, v: prim.relu_linear_attention(q, k, v, 1e-6)):
        expected = make(*views)
        assert same_bits(make(*contiguous), expected) and same_bits(make(*strided), expected)
        mx.eval(expected, sana._merge_heads(expected))  # whatever was pending, done
        before = mx.get_active_memory()
        merged = sana._merge_heads(expected)
        mx.eval(merged)
        assert mx.get_active_memory() == before, "merging the heads copied the output"
        assert same_bits(merged, np.array(expected).transpose(0, 2, 1, 3).reshape(batch, rows, -1))
        del merged, expected  # (the next round's measure must not see these freed)


def test_the_nodes_as_graph_nodes():
    q, k, v = (mx.random.normal((2, 4, n, 16), key=mx.random.key(i)) for i, n in enumerate((64, 48, 48)))
    bias = key_bias(2, 48, "padded")
    built_lazily(lambda: [q, k, v], lambda *x: prim.softmax_attention(*x, 0.25, bias))
    built_lazily(lambda: [q, k, v], lambda *x: prim.relu_linear_attention(*x, 1e-15))
    mx.eval(q, k, v, bias)
    copies = [np.array(a) for a in (q, k, v, bias)]
    ops = [lambda *x: prim.softmax_attention(*x, 0.25, bias), lambda *x: prim.relu_linear_attention(*x, 1e-15)]
    for op in ops:
        expected = op(q, k, v)
        mx.eval(expected)
        assert all(same_bits(a, c) for a, c in zip((q, k, v, bias), copies))  # inputs never written
        assert same_bits(op(q, k, v), expected)
        compiled = mx.compile(lambda *x, op=op: op(*x) * 2.0)
        assert same_bits(compiled(q, k, v), expected * 2.0)
        first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
        with mx.stream(first):
            a = op(q, k, v)
        with mx.stream(second):
            b = op(q, k, v)
        mx.eval(a, b)  # both streams at once: the kernels' pool takes turns
        assert same_bits(a, expected) and same_bits(b, expected)
    with pytest.raises(ValueError):
        prim.extension().softmax_attention(q, k, v, 0.25, None, stream=mx.Device(mx.gpu))


def test_gradients_and_vmap_go_through_the_plain_formula():
    q, k, v = (mx.random.normal((1, 2, n, 8), key=mx.random.key(i)) for i, n in enumerate((6, 5, 5)))
    bias = key_bias(1, 5, "padded")
    soft = lambda *x: prim.softmax_attention(*x, 0.3, bias)  # noqa: E731
    soft_plain = lambda *x: prim.softmax_attention_reference(*x, 0.3, bias)  # noqa: E731
    lin = lambda *x: prim.relu_linear_attention(*x, 1e-6)  # noqa: E731
    lin_plain = lambda *x: prim.relu_linear_attention_reference(*x, 1e-6)  # noqa: E731
    for node, plain in ((soft, soft_plain), (lin, lin_plain)):
        grads = mx.grad(lambda *x: (node(*x) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
        wants = mx.grad(lambda *x: (plain(*x) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
        assert all(relative_error(g, w) < 1e-5 for g, w in zip(grads, wants))
        batched = mx.vmap(lambda a: node(a[None], k, v)[0])(q)
        assert relative_error(batched, plain(q, k, v)) < 1e-5


def test_what_the_nodes_do_not_take_they_say():
    q, k, v = (mx.random.normal((2, 4, n, 16), key=mx.random.key(i)) for i, n in enumerate((8, 6, 6)))
    assert prim.softmax_attention_supported(q, k, v, key_bias(2, 6, "padded"))
    assert prim.softmax_attention_supported(q, k, v, key_bias(2, 6, "padded")[:1])  # one bias for the batch
    assert not prim.softmax_attention_supported(q, k, v, mx.zeros((2, 1, 8, 6)))  # a bias per query
    assert not prim.softmax_attention_supported(q, k, v, mx.zeros((2, 1, 1, 6), dtype=mx.float16))
    assert not prim.softmax_attention_supported(q.astype(mx.float16), k, v)
    assert prim.softmax_attention_supported(q, k[:, :2], v[:, :2])  # grouped heads: 2 query heads a KV head
    assert not prim.softmax_attention_supported(q, k[:, :3], v[:, :3])  # 3 KV heads do not divide 4
    assert not prim.softmax_attention_supported(q, k[:, :2], v)  # k and v with different heads
    assert prim.softmax_attention_supported(q[:, :, :6], k, v, causal=True)
    assert not prim.softmax_attention_supported(q, k, v, causal=True)  # more queries than keys
    assert not prim.softmax_attention_supported(q, k[..., :8], v)
    assert not prim.softmax_attention_supported(q[0], k[0], v[0])
    assert prim.relu_linear_attention_supported(q, k, v) and not prim.relu_linear_attention_supported(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="key_bias"):
        prim.softmax_attention(q, k, v, 0.25, mx.zeros((2, 1, 8, 6)))
    with pytest.raises(ValueError, match="causal"):
        prim.softmax_attention(q, k, v, 0.25, causal=True)
    with pytest.raises(ValueError, match="heads_kv"):
        prim.softmax_attention(q, k[:, :3], v[:, :3], 0.25)
    with pytest.raises(ValueError, match="float32"):
        prim.relu_linear_attention(q, k, v.astype(mx.bfloat16), 1e-15)


# ------------------------------------------------------------------------------ CPU forms
def _random(module, seed):
    rng = np.random.default_rng(seed)
    module.update(nn.utils.tree_map(lambda p: mx.array((rng.standard_normal(p.shape) * 0.1).astype(np.float32)),
                                    module.parameters()))
    return module


def _dit_block(heads=4, head_dim=16, cross_heads=2, cross_head_dim=32, seed=0):
    config = sana.SanaConfig(in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=head_dim,
                             num_layers=1, num_cross_attention_heads=cross_heads,
                             cross_attention_head_dim=cross_head_dim, cross_attention_dim=heads * head_dim,
                             caption_channels=24)
    return _random(sana.SanaTransformerBlock(config), seed)


@pytest.mark.parametrize("batch, masked", [(1, False), (2, True)])
def test_the_dit_attention_forms_take_the_nodes_and_match_the_plain_modules(batch, masked, monkeypatch):
    monkeypatch.setattr(tuning, "ATTENTION_NATIVE_MIN_MACS", 0)
    block = _dit_block(seed=batch)
    fast = backends.accelerate(block, "dit")
    assert type(fast.attn2.attention) is layers.ScaledDotProductAttention
    assert type(fast.attn1.attention) is layers.ReLULinearAttention
    x = mx.random.normal((batch, 36, 64), key=mx.random.key(1))
    context = mx.random.normal((batch, 11, 64), key=mx.random.key(2))
    bias = key_bias(batch, 11, "padded") if masked else None
    keys, values = fast.attn2.keys_values(context)
    plain_attn2 = sana.SanaCrossAttention.__new__(sana.SanaCrossAttention)
    dict.update(plain_attn2, fast.attn2)
    plain_attn2.__dict__.update(fast.attn2.__dict__)
    dict.__setitem__(plain_attn2, "attention", common.ScaledDotProductAttention())
    plain_attn1 = sana.SanaLinearAttention.__new__(sana.SanaLinearAttention)
    dict.update(plain_attn1, fast.attn1)
    plain_attn1.__dict__.update(fast.attn1.__dict__)
    dict.__setitem__(plain_attn1, "attention", common.ReLULinearAttention(sana.LINEAR_ATTENTION_EPS))

    cross = fast.attn2(x, keys, values, bias)
    assert has(SOFTMAX, cross)
    assert relative_error(cross, plain_attn2(x, keys, values, bias)) < 2e-6
    linear = fast.attn1(x)
    assert has(LINEAR, linear)
    assert relative_error(linear, plain_attn1(x)) < 2e-6
    # the whole block (17b's form or the plain one calls attn1 / attn2 as they are)
    modulation = mx.random.normal((batch, 6, 64), key=mx.random.key(3)) * 0.1
    args = (6, 6, modulation, keys, values, bias)
    with_nodes = fast(x, *args)
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    twin = fast(x, *args)
    assert not has(SOFTMAX, twin) and not has(LINEAR, twin)
    assert relative_error(with_nodes, twin) < 2e-6


def test_the_dit_attention_forms_keep_the_mlx_path_below_the_threshold_and_in_twin_mode(monkeypatch):
    fast = backends.accelerate(_dit_block(), "dit")
    x = mx.random.normal((2, 16, 64), key=mx.random.key(4))
    keys, values = fast.attn2.keys_values(mx.random.normal((2, 5, 64), key=mx.random.key(5)))
    bias = key_bias(2, 5, "padded")
    small = fast.attn2(x, keys, values, bias), fast.attn1(x)  # under tuning.ATTENTION_NATIVE_MIN_MACS
    assert not has(SOFTMAX, *small) and not has(LINEAR, *small)
    monkeypatch.setattr(tuning, "ATTENTION_NATIVE_MIN_MACS", 0)
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    twin = fast.attn2(x, keys, values, bias), fast.attn1(x)
    assert same_bits(twin[0], small[0]) and same_bits(twin[1], small[1])
    monkeypatch.setattr(prim, "_extension", None)  # no extension: the twins
    monkeypatch.setattr(prim, "_error", "not built (simulated)")
    monkeypatch.delenv("MOBILEO_MLX_KERNELS")
    assert same_bits(fast.attn2(x, keys, values, bias), small[0]) and same_bits(fast.attn1(x), small[1])


def test_the_dcae_litemla_takes_the_linear_node(monkeypatch):
    monkeypatch.setattr(tuning, "ATTENTION_NATIVE_MIN_MACS", 0)
    plain = _random(dcae.SanaMultiscaleLinearAttention(64, 16, (5,), "rms_norm"), seed=6)
    x = mx.random.normal((1, 9, 7, 64), key=mx.random.key(6))
    expected = plain(x)
    fast = backends.accelerate(plain, "vae")
    out = fast(x)
    assert has(LINEAR, out)
    assert relative_error(out, expected) < 2e-6


def test_fastvit_attention_takes_the_softmax_node(monkeypatch):
    """FastViT's attention (its q, k, v are views of one qkv projection) through the node, against
    the plain module (MLX's scaled_dot_product_attention)."""
    monkeypatch.setattr(tuning, "ATTENTION_NATIVE_MIN_MACS", 0)
    plain = _random(fastvit.Attention(96, 32), seed=7)
    x = mx.random.normal((1, 5, 7, 96), key=mx.random.key(7))
    expected = plain(x)
    fast = backends.accelerate(plain, "vision")
    assert type(fast.attention) is layers.ScaledDotProductAttention
    out = fast(x)
    assert has(SOFTMAX, out)
    assert relative_error(out, expected) < 2e-6


@pytest.mark.parametrize("heads, kv_heads, hidden", [(4, 2, 32), (14, 2, 112)])  # 14 / 2: Qwen2-0.5B's groups
def test_the_qwen2_prefill_takes_the_causal_node_and_matches_mlx_lm(heads, kv_heads, hidden, monkeypatch):
    """The Qwen2 CPU form's prefill through the node (the cache's K/V views read in place) against
    mlx-lm's own modules: a whole prefill, a chunked one through a prompt cache (queries fewer
    than keys), decoding; array masks keep the MLX form."""
    from mlx_lm.models import qwen2
    from mlx_lm.models.cache import make_prompt_cache

    from mobileo_mlx.models.language import LanguageConfig, LanguageModel

    monkeypatch.setattr(tuning, "ATTENTION_NATIVE_MIN_MACS", 0)
    config = LanguageConfig(hidden_size=hidden, num_hidden_layers=2, intermediate_size=48, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, vocab_size=100)
    plain = _random(LanguageModel(config), seed=heads)
    fast = backends.accelerate(LanguageModel(config), "language")
    fast.update(plain.parameters())
    assert type(fast.model.layers[0].self_attn) is layers.Qwen2Attention
    ids = mx.array([[5, 17, 3, 99, 42, 7, 7, 1, 60, 33, 2, 8, 19, 21, 70, 4, 3]])
    logits = fast(ids)
    assert has(SOFTMAX, logits)
    assert relative_error(logits, plain(ids)) < 1e-5
    caches = make_prompt_cache(fast), make_prompt_cache(plain)
    for chunk in (ids[:, :6], ids[:, 6:13], ids[:, 13:14], ids[:, 14:]):  # a cache offset of 6, decoding, 14
        got, want = fast(chunk, cache=caches[0]), plain(chunk, cache=caches[1])
        assert has(SOFTMAX, got) == (chunk.shape[1] > 1)
        assert relative_error(got, want) < 1e-5
    attention = fast.model.layers[0].self_attn
    x = mx.random.normal((2, 6, hidden), key=mx.random.key(8))
    for mask in (None, "causal"):
        out = attention(x, mask)
        assert has(SOFTMAX, out)
        assert relative_error(out, qwen2.Attention.__call__(attention, x, mask)) < 1e-5
    keep = mx.array([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    for mask in (keep, mx.where(keep, 0.0, -1e9)):
        out = attention(x, mask)
        assert not has(SOFTMAX, out)
        assert relative_error(out, qwen2.Attention.__call__(attention, x, mask)) < 1e-5
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    assert not has(SOFTMAX, attention(x, "causal"))


def test_the_qwen2_prefill_keeps_the_mlx_form_below_the_threshold():
    from mobileo_mlx.models.language import LanguageConfig, LanguageModel

    config = LanguageConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=48, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100)
    fast = backends.accelerate(_random(LanguageModel(config), seed=1), "language")
    assert not has(SOFTMAX, fast(mx.array([[5, 17, 3, 99, 42]])))  # under tuning.ATTENTION_NATIVE_MIN_MACS
