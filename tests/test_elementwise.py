"""The element-wise native nodes (native/silu.c, native/norms.c as kernels.primitives' silu,
glu_silu, rms_norm_residual, modulated_layer_norm, gated_residual) and the CPU forms that take
them: each node against the MLX form it replaces, bit for bit, and against float64; odd sizes
and vector tails, batch 1 and 2, strided inputs; what a graph node promises (nothing evaluated
while the graph is built, mx.compile and two streams give the same bits, inputs never written,
transformations through the plain formula); the CPU forms against the plain modules."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io
import platform

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mobileo_mlx import backends
from mobileo_mlx.backends.cpu import activations, layers
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.models import common, dcae, sana
from mobileo_mlx.models.language import LanguageConfig, LanguageModel
from tests.test_backends import SMALL_CONFIGS, randomized, rebuild
from tests.test_primitives import built_lazily, relative_error, same_bits

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(not prim.available(), reason=f"graph nodes {prim.unavailable_reason()}"),
]
NODES = ("MobileoSilu", "MobileoGluSilu", "MobileoRmsNormResidual", "MobileoModulatedLayerNorm",
         "MobileoGatedResidual")
# MLX's CPU reduction sums a contiguous axis in index order on x86-64 (a running sum), as the
# norm kernels do: bit for bit there; elsewhere within the bound below.
IN_ORDER_SUMS = platform.machine() in ("x86_64", "AMD64")


def nodes(*outputs) -> set[str]:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return {name for name in NODES if f'"{name}"' in dot.getvalue()}


def same_norm(got, want) -> bool:
    """The norms' bits where MLX sums in order, else a few float32 ulps of the largest output."""
    if IN_ORDER_SUMS:
        return same_bits(got, want)
    return relative_error(got, want) < 1e-6


def same_values(got, want) -> bool:
    """Bit for bit but for the sign of a NaN (which MLX's kernels do not define either)."""
    got, want = np.array(got), np.array(want)
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan)) and same_bits(got[~nan], want[~nan])


def normal(shape, seed, scale=1.0, offset=0.0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal(shape) * scale + offset).astype(np.float32))


SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.0, -88.0, 88.5, -88.5, 87.9, -87.3, 1e-30, -1e-30, 1e-45,
                    200.0, -200.0, 1e30, -1e30], np.float32)


def activation_values(shape, seed) -> mx.array:
    x = np.array(normal(shape, seed, scale=8.0)).reshape(-1)
    x[: min(x.size, SPECIAL.size)] = SPECIAL[: x.size]
    return mx.array(x.reshape(shape))


def silu64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


# ----------------------------------------------------------------------------------- SiLU
@pytest.mark.parametrize("shape", [(), (7,), (15,), (17,), (1000, 3), (2, 300, 517), (1, 9, 11, 128)])
def test_silu_is_bit_identical_to_the_mlx_form(shape):
    x = activation_values(shape, seed=len(shape) + 1)
    y = prim.silu(x)
    assert nodes(y) == {"MobileoSilu"} and y.shape == x.shape
    assert same_values(y, activations._silu_whole(x))  # the MLX kernels the CPU form ran


def test_silu_against_float64():
    x = normal((3, 1000, 37), seed=2, scale=20.0)
    got, want = np.array(prim.silu(x), np.float64), silu64(x)
    normal_range = np.array(x) > -87.3  # where sigmoid(x) is a normal float
    assert np.all(np.abs(got - want)[normal_range] <= 3e-7 * np.abs(want)[normal_range] + 1e-38)
    assert relative_error(got, prim.silu_reference(x)) < 1e-6  # the plain formula (nn.silu)


def test_silu_of_views_and_of_a_temporary():
    x = normal((600, 40), seed=3, scale=4.0)
    for view in (x.T, x[::3, 5:], x[:, 3]):
        assert same_bits(prim.silu(view), activations._silu_whole(view))
    assert same_bits(prim.silu(x * 1.0), activations._silu_whole(x))  # its buffer may become the output's


@pytest.mark.parametrize("shape", [(5,), (16,), (33,), (2, 7, 4864), (1, 300, 517)])
def test_glu_silu_is_bit_identical_to_the_mlx_form(shape):
    a = activation_values(shape, seed=4)
    g = activation_values(shape, seed=5)[::-1] if len(shape) == 1 else activation_values(shape, seed=5)
    y = prim.glu_silu(a, g)
    assert nodes(y) == {"MobileoGluSilu"}
    assert same_values(y, activations._glu_silu_whole(a, g))
    finite = normal(shape, seed=6, scale=3.0), normal(shape, seed=7, scale=3.0)
    got = np.array(prim.glu_silu(*finite), np.float64)
    want = np.asarray(finite[0], np.float64) * silu64(finite[1])
    assert np.all(np.abs(got - want) <= 4e-7 * np.abs(want) + 1e-38)
    # a transposed gate is read as the same elements
    if len(shape) == 3:
        column_major = mx.contiguous(g.transpose(2, 1, 0)).transpose(2, 1, 0)
        assert same_values(prim.glu_silu(a, column_major), activations._glu_silu_whole(a, g))


# ------------------------------------------------------------------------ RMSNorm + residual
def rms64(y, weight, bias, eps, residual=None) -> np.ndarray:
    y = np.asarray(y, np.float64)
    out = y / np.sqrt((y * y).mean(-1, keepdims=True) + eps) * np.asarray(weight, np.float64) + np.asarray(bias,
                                                                                                         np.float64)
    return out if residual is None else out + np.asarray(residual, np.float64)


@pytest.mark.parametrize("shape", [(1, 5, 7, 8), (2, 3, 9, 37), (1, 6, 10, 128), (2, 2, 3, 1152), (4, 1),
                                   (1, 64, 64, 16)])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no residual"])
def test_rms_norm_residual_against_its_twin_and_float64(shape, residual):
    dim = shape[-1]
    y = normal(shape, seed=dim, scale=3.0, offset=0.5)
    weight, bias = normal((dim,), seed=1), normal((dim,), seed=2)
    x = normal(shape, seed=3) if residual else None
    out = prim.rms_norm_residual(y, weight, bias, 1e-5, x)
    assert nodes(out) == {"MobileoRmsNormResidual"} and out.shape == y.shape
    assert same_norm(out, prim.rms_norm_residual_reference(y, weight, bias, 1e-5, x))
    assert relative_error(out, rms64(y, weight, bias, 1e-5, x)) < 1e-6


def test_rms_norm_residual_reads_strided_rows_in_place_and_gathers_others():
    wide = normal((2, 6, 11, 40), seed=4, scale=2.0)
    weight, bias, x = normal((40,), seed=5), normal((40,), seed=6), normal((2, 6, 9, 40), seed=7)
    for y in (wide[:, :, :9],  # a cropped view (the DC-AE's conv output): rows read through their strides
              normal((2, 6, 40, 9), seed=8).transpose(0, 1, 3, 2),  # the last axis strided: gathered
              mx.broadcast_to(normal((1, 1, 9, 40), seed=9), (2, 6, 9, 40))):
        for residual in (x, mx.contiguous(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3), wide[:, :, 2:]):
            want = prim.rms_norm_residual_reference(y, weight, bias, 1e-6, residual)
            assert same_norm(prim.rms_norm_residual(y, weight, bias, 1e-6, residual), want)
    # a temporary y no one else holds becomes the output
    y = wide[:, :, :9] * 1.0
    assert same_norm(prim.rms_norm_residual(y, weight, bias, 1e-6, x),
                     prim.rms_norm_residual_reference(wide[:, :, :9], weight, bias, 1e-6, x))


def test_rms_norm_residual_of_special_rows():
    y = np.array(normal((6, 24), seed=10))
    y[0] = 0.0  # rsqrt(eps)
    y[1, 3] = np.inf
    y[2, 5] = np.nan
    y[3] *= 1e-20  # sum of squares underflows to subnormals / zero
    y[4] *= 1e18  # sum of squares overflows
    weight, bias, x = normal((24,), seed=11), normal((24,), seed=12), normal((6, 24), seed=13)
    got = np.array(prim.rms_norm_residual(mx.array(y), weight, bias, 1e-5, x))
    want = np.array(prim.rms_norm_residual_reference(mx.array(y), weight, bias, 1e-5, x))
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and same_norm(got[~nan], want[~nan])


# --------------------------------------------------------------------- SANA's AdaLN and gate
def layer_norm64(x, shift, scale, eps) -> np.ndarray:
    x = np.asarray(x, np.float64)
    centred = x - x.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)
    return normed * (1 + np.asarray(scale, np.float64)) + np.asarray(shift, np.float64)


@pytest.mark.parametrize("batch, tokens, dim", [(1, 5, 16), (2, 9, 37), (2, 256, 1152), (1, 3, 72), (2, 1, 8)])
@pytest.mark.parametrize("per", ["image", "shared", "vector"])
def test_modulated_layer_norm_against_its_twin_and_float64(batch, tokens, dim, per):
    x = normal((batch, tokens, dim), seed=dim, scale=2.0, offset=3.0)  # an offset: the centring matters
    lead = {"image": (batch, 1), "shared": (1, 1), "vector": ()}[per]
    shift, scale = normal((*lead, dim), seed=1), normal((*lead, dim), seed=2, scale=0.5)
    out = prim.modulated_layer_norm(x, shift, scale, 1e-6)
    assert nodes(out) == {"MobileoModulatedLayerNorm"} and out.shape == x.shape
    assert same_norm(out, prim.modulated_layer_norm_reference(x, shift, scale, 1e-6))
    assert same_norm(out, sana._modulate(nn.LayerNorm(dim, eps=1e-6, affine=False)(x), shift, scale))
    assert relative_error(out, layer_norm64(x, shift, scale, 1e-6)) < 1e-6


@pytest.mark.parametrize("batch, tokens, dim", [(1, 5, 16), (2, 9, 37), (2, 256, 1152), (2, 1, 3)])
def test_gated_residual_is_bit_identical_to_its_twin(batch, tokens, dim):
    x, update = normal((batch, tokens, dim), seed=1), normal((batch, tokens, dim), seed=2)
    gate = normal((batch, 1, dim), seed=3)
    out = prim.gated_residual(x, gate, update)
    assert nodes(out) == {"MobileoGatedResidual"}
    assert same_bits(out, sana._gated_residual(x, gate, update))
    assert same_bits(out, prim.gated_residual_reference(x, gate, update))
    assert same_bits(prim.gated_residual(x * 1.0, gate[:1], update), x + gate[:1] * update)  # donated x
    assert same_bits(prim.gated_residual(x, gate, update * 1.0), x + gate * update)  # donated update


# ------------------------------------------------------------------------- graph behaviour
def node_ops():
    x, g = normal((4, 33, 40), seed=20, scale=3.0), normal((4, 33, 40), seed=21, scale=3.0)
    weight, bias, gate = normal((40,), seed=22), normal((40,), seed=23), normal((4, 1, 40), seed=24)
    return [
        (prim.silu, [x]),
        (prim.glu_silu, [x, g]),
        (lambda y, w, b, r: prim.rms_norm_residual(y, w, b, 1e-5, r), [x, weight, bias, g]),
        (lambda v, shift, scale: prim.modulated_layer_norm(v, shift, scale, 1e-6), [x, gate, gate * 0.5]),
        (prim.gated_residual, [x, gate, g]),
    ]


def test_building_the_nodes_evaluates_nothing():
    for op, inputs in node_ops():
        built_lazily(lambda inputs=inputs: list(inputs), op)


def test_compile_streams_and_inputs_never_written():
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    for op, inputs in node_ops():
        mx.eval(inputs)
        copies = [np.array(v) for v in inputs]
        expected = op(*inputs)
        mx.eval(expected)
        assert all(same_bits(v, c) for v, c in zip(inputs, copies))
        compiled = mx.compile(lambda *v, op=op: op(*v) * 2.0)
        assert same_bits(compiled(*inputs), expected * 2.0)
        with mx.stream(first):
            a = op(*inputs)
        with mx.stream(second):
            b = op(*inputs)
        mx.eval(a, b)
        assert same_bits(a, expected) and same_bits(b, expected)


def test_gradients_and_vmap_go_through_the_plain_formula():
    references = [prim.silu_reference, prim.glu_silu_reference,
                  lambda y, w, b, r: prim.rms_norm_residual_reference(y, w, b, 1e-5, r),
                  lambda v, shift, scale: prim.modulated_layer_norm_reference(v, shift, scale, 1e-6),
                  prim.gated_residual_reference]
    for (op, inputs), reference in zip(node_ops(), references):
        argnums = tuple(range(len(inputs)))
        got = mx.grad(lambda *v, op=op: (op(*v) * v[0]).sum(), argnums=argnums)(*inputs)
        want = mx.grad(lambda *v, f=reference: (f(*v) * v[0]).sum(), argnums=argnums)(*inputs)
        assert all(relative_error(g, w) < 1e-5 for g, w in zip(got, want))
        tangent = mx.jvp(op, inputs, [mx.ones_like(v) for v in inputs])[1][0]
        assert relative_error(tangent, mx.jvp(reference, inputs, [mx.ones_like(v) for v in inputs])[1][0]) < 1e-5
    x = normal((6, 50), seed=25, scale=3.0)
    assert same_bits(mx.vmap(prim.silu, in_axes=1)(x), activations._silu_whole(x).T)


def test_what_the_nodes_do_not_take_they_say():
    x = normal((2, 5, 24), seed=30)
    w, gate = normal((24,), seed=31), normal((2, 1, 24), seed=32)
    assert not prim.silu_supported(x.astype(mx.float16)) and not prim.silu_supported(mx.zeros((0, 3)))
    assert prim.glu_silu_supported(x, x) and not prim.glu_silu_supported(x, x[:1])  # broadcast gate: MLX form
    assert prim.rms_norm_residual_supported(x, w, w, x) and prim.rms_norm_residual_supported(x, w, w)
    assert not prim.rms_norm_residual_supported(x, w[:20], w)
    assert not prim.rms_norm_residual_supported(x, w, w, x[:1])
    assert not prim.rms_norm_residual_supported(x.astype(mx.bfloat16), w, w)
    assert prim.modulated_layer_norm_supported(x, gate, gate) and prim.modulated_layer_norm_supported(x, w, w)
    assert not prim.modulated_layer_norm_supported(x, normal((2, 5, 24), seed=33), gate)  # per token
    assert not prim.modulated_layer_norm_supported(x[0], gate, gate)
    assert prim.gated_residual_supported(x, gate, x) and not prim.gated_residual_supported(x, gate, x[:, :4])
    assert not prim.gated_residual_supported(x, normal((3, 1, 24), seed=34), x)
    for call in (lambda: prim.glu_silu(x, x[:1]), lambda: prim.rms_norm_residual(x, w[:20], w, 1e-5),
                 lambda: prim.silu(x.astype(mx.float16))):
        with pytest.raises(ValueError):
            call()


# --------------------------------------------------------------------------------- CPU forms
def run_modes(monkeypatch, build):
    """build() under MOBILEO_MLX_KERNELS=auto and =twin: (auto's output, twin's output)."""
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    auto = build()
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    twin = build()
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    return auto, twin


def test_silu_and_the_gate_of_the_cpu_forms_take_the_nodes(monkeypatch):
    x = normal((2, 9, 11, 64), seed=40, scale=4.0)
    auto, twin = run_modes(monkeypatch, lambda: layers.SiLU()(x))
    assert nodes(auto) == {"MobileoSilu"} and not nodes(twin) and same_bits(auto, twin)
    assert relative_error(auto, nn.silu(x)) < 1e-6
    # inside a two-stream piece the MLX kernels run (the other stream holds the other piece)
    pieces = layers.streams.cpu_pieces(2, lambda i: activations.silu(x[i]))
    assert not nodes(*pieces) and all(same_bits(p, auto[i]) for i, p in enumerate(pieces))
    assert not nodes(activations.silu(x.astype(mx.float16)))
    config = LanguageConfig(**SMALL_CONFIGS["language"])
    plain = randomized(LanguageModel(config), seed=4, scale=0.2)
    fast = backends.accelerate(rebuild(plain), "language")
    ids = mx.array([[5, 17, 3, 99, 42, 7, 7, 1]])
    auto, twin = run_modes(monkeypatch, lambda: fast(ids))
    assert "MobileoGluSilu" in nodes(auto) and not nodes(twin) and same_bits(auto, twin)
    assert relative_error(auto, plain(ids)) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_dcae_cpu_forms_take_the_nodes_and_give_the_bits_of_their_mlx_forms(batch, monkeypatch):
    """The ResBlock (SiLU, RMSNorm + bias + residual), the EfficientViT block (LiteMLA's norm_out,
    GLUMBConv's norm and residual) and the decoder's norm_out."""
    x = normal((batch, 6, 5, 40), seed=41)
    for plain, expected in ((dcae.ResBlock(40, 40, "rms_norm", "silu"), {"MobileoSilu", "MobileoRmsNormResidual"}),
                            (dcae.EfficientViTBlock(40, 8, (5,), "rms_norm"), {"MobileoRmsNormResidual"}),
                            (common.RMSNorm(40), {"MobileoRmsNormResidual"})):
        randomized(plain, seed=5, scale=0.2)
        fast = backends.accelerate(rebuild(plain), "vae")
        auto, twin = run_modes(monkeypatch, lambda: fast(x))
        assert expected <= nodes(auto) and not nodes(twin)
        assert same_norm(auto, twin)
        assert relative_error(auto, plain(x)) < 1e-5
    norm = randomized(common.RMSNorm(40), seed=6)
    fast = backends.accelerate(rebuild(norm), "vae")
    assert type(fast) is layers.RMSNorm and same_norm(fast(x), norm(x))  # the plain module is its own twin


def dit_block_inputs(config: sana.SanaConfig, batch: int, seed: int = 50):
    dim, height, width = config.inner_dim, 3, 5
    x = normal((batch, height * width, dim), seed=seed)
    modulation = normal((batch, 6, dim), seed=seed + 1, scale=0.3)
    heads, depth = config.num_cross_attention_heads, config.cross_attention_head_dim
    keys, values = normal((batch, heads, 7, depth), seed=seed + 2), normal((batch, heads, 7, depth), seed=seed + 3)
    key_bias = mx.array(np.where(np.arange(7) < 5, 0.0, -10000.0).astype(np.float32))[None, None, None]
    return x, height, width, modulation, keys, values, key_bias


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dims", [(2, 8), (3, 12)], ids=["D=16", "D=36"])  # D a multiple of 16, and a tail
def test_sana_block_cpu_form_gives_the_plain_blocks_bits(batch, dims):
    """Only the block swapped (its children plain): the AdaLN norms and gated residuals as nodes
    give the plain block's output bit for bit."""
    heads, depth = dims
    config = sana.SanaConfig(in_channels=8, num_attention_heads=heads, attention_head_dim=depth, num_layers=1,
                             num_cross_attention_heads=2, cross_attention_head_dim=heads * depth // 2,
                             cross_attention_dim=heads * depth, caption_channels=24)
    plain = randomized(sana.SanaTransformerBlock(config), seed=7, scale=0.3)
    fast = backends.swap(rebuild(plain), {sana.SanaTransformerBlock: layers.SanaTransformerBlock})
    inputs = dit_block_inputs(config, batch)
    out = fast(*inputs)
    assert nodes(out) == {"MobileoModulatedLayerNorm", "MobileoGatedResidual"}
    assert same_norm(out, plain(*inputs))
    norm = sana.SanaModulatedNorm(config.inner_dim, 1e-6)
    fast_norm = backends.swap(norm, {sana.SanaModulatedNorm: layers.SanaModulatedNorm})
    embedding, table = normal((batch, config.inner_dim), seed=8), normal((2, config.inner_dim), seed=9)
    got = fast_norm(inputs[0], embedding, table)
    assert nodes(got) == {"MobileoModulatedLayerNorm"}
    assert same_norm(got, sana.SanaModulatedNorm.__call__(fast_norm, inputs[0], embedding, table))


def test_sana_block_with_an_affine_norm2_keeps_the_plain_norm():
    config = sana.SanaConfig(in_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                             num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                             caption_channels=24, norm_elementwise_affine=True)
    plain = randomized(sana.SanaTransformerBlock(config), seed=10, scale=0.3)
    fast = backends.swap(rebuild(plain), {sana.SanaTransformerBlock: layers.SanaTransformerBlock})
    inputs = dit_block_inputs(config, 2)
    out = fast(*inputs)
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    assert dot.getvalue().count('"MobileoModulatedLayerNorm"') == 1  # norm1 only
    assert same_norm(out, plain(*inputs))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_whole_dit_takes_the_nodes_and_gives_its_twin_modes_bits(batch, monkeypatch):
    config = sana.SanaConfig(**SMALL_CONFIGS["dit"])
    plain = randomized(sana.SanaTransformer(config), seed=11, scale=0.2)
    fast = backends.accelerate(rebuild(plain), "dit")
    assert type(fast.transformer_blocks[0]) is layers.SanaTransformerBlock
    assert type(fast.norm_out) is layers.SanaModulatedNorm
    latents = normal((batch, 4, 4, config.in_channels), seed=12)
    caption = normal((batch, 6, config.caption_channels), seed=13)
    auto, twin = run_modes(monkeypatch, lambda: fast(latents, mx.array([500] * batch), caption))
    assert {"MobileoModulatedLayerNorm", "MobileoGatedResidual"} <= nodes(auto) and not nodes(twin)
    assert same_norm(auto, twin)
    assert relative_error(auto, plain(latents, mx.array([500] * batch), caption)) < 1e-5


def test_without_the_extension_the_cpu_forms_run_their_mlx_forms(monkeypatch):
    x = normal((2, 6, 5, 40), seed=60)
    block = randomized(dcae.ResBlock(40, 40, "rms_norm", "silu"), seed=6, scale=0.2)
    fast = backends.accelerate(rebuild(block), "vae")
    with_nodes = fast(x)
    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", "not built (simulated)")
    without = fast(x)
    assert not nodes(without) and same_norm(without, with_nodes)
    assert not nodes(activations.glu_silu(x, x))
