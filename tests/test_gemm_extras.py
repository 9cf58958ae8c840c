"""What the bf16 GEMM does besides the product (native/bf16_gemm.c's extras, kernels.primitives'
``bf16_matmul_q8(..., norm=, residual=, gate=)``, ``bf16_conv(..., silu=, norm=, residual=)``, the
sub-pixel conv's shortcut) and its B packed from 4-bit words (``bf16_matmul_q4``), and the CPU forms
that take them (SANA's block, the DC-AE's ResBlock, upsampler and LiteMLA, the language model's 4-bit
layers while encoding): each fused node gives the bits of the separate nodes it replaces (the same
operations and roundings, made as the kernel packs its rows or stores its results), on both kernels
(AMX and the AVX512-BF16 register tile); against its plain-MLX twin and float64; built lazily, its
inputs never written; what it does not take, it says."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mobileo_mlx import backends
from mobileo_mlx.backends import tuning
from mobileo_mlx.backends.cpu import layers
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.models import dcae, sana
from tests.test_backends import randomized, rebuild
from tests.test_primitives import bf16_rounded, built_lazily, q8_operands, q8_weight, relative_error, same_bits

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(prim.extension() is None or not prim.extension().bf16_supported(),
                       reason="no bf16 GEMM here (no graph nodes, or no AVX512-BF16)"),
]
ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6

# (images, tokens, K, N): M = images x tokens rows; tails of the 16-row tiles, of N's 32-column panels
# and of K's 32-k chunks; the DiT's K
SHAPES = [(1, 1, 64, 40), (2, 5, 64, 33), (1, 37, 128, 80), (2, 24, 192, 100), (2, 256, 1152, 96)]


def node_names(*outputs) -> set[str]:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    text = dot.getvalue()
    return {name for name in ("MobileoBf16MatmulQ8", "MobileoModulatedLayerNorm", "MobileoGatedResidual",
                              "MobileoSilu", "MobileoBf16Conv", "MobileoReluLinearAttention") if f'"{name}"' in text}


def operands(images: int, tokens: int, k: int, n: int, seed: int) -> dict:
    x, values, scales, biases, row = q8_operands(images * tokens, k, n, True, seed=seed)
    rng = np.random.default_rng(seed + 1)
    per_image = lambda width, scale: (rng.standard_normal((images, 1, width)) * scale).astype(np.float32)  # noqa: E731
    return {"x": x.reshape(images, tokens, k), "values": values, "scales": scales, "biases": biases, "bias": row,
            "shift": per_image(k, 0.5), "scale": per_image(k, 0.5), "gate": per_image(n, 1.0),
            "residual": rng.standard_normal((images, tokens, n)).astype(np.float32)}


def fused_and_separate(o: dict) -> list[tuple[str, mx.array, mx.array]]:
    """(what, the fused node's output, the separate nodes') for each combination of the extras."""
    a = {name: mx.array(value) for name, value in o.items()}
    weights = (a["values"], a["scales"], a["biases"], 64, a["bias"])
    norm = (a["shift"], a["scale"], EPS)
    normed = prim.modulated_layer_norm(a["x"], a["shift"], a["scale"], EPS)
    plain = prim.bf16_matmul_q8(a["x"], *weights)
    of_normed = prim.bf16_matmul_q8(normed, *weights)
    return [
        ("norm", prim.bf16_matmul_q8(a["x"], *weights, norm=norm), of_normed),
        ("residual", prim.bf16_matmul_q8(a["x"], *weights, residual=a["residual"]), a["residual"] + plain),
        ("gated residual", prim.bf16_matmul_q8(a["x"], *weights, residual=a["residual"], gate=a["gate"]),
         prim.gated_residual(a["residual"], a["gate"], plain)),
        ("all", prim.bf16_matmul_q8(a["x"], *weights, norm=norm, residual=a["residual"], gate=a["gate"]),
         prim.gated_residual(a["residual"], a["gate"], of_normed)),
    ]


# convs (batch, height, width, C, O): one part of rows (M < 128), the AMX parts over rows, and over rows
# in groups of tile pairs (B larger than a core's L2)
CONV_SHAPES = [(1, 7, 9, 16, 24), (2, 20, 33, 40, 48), (1, 40, 40, 512, 512)]


def conv_operands(batch, height, width, channels, out, seed):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: mx.array((rng.standard_normal(shape) * scale).astype(np.float32))  # noqa: E731
    return (normal(batch, height, width, channels), normal(out, 3, 3, channels, scale=0.2), normal(out),
            (normal(out), normal(out), 1e-5), normal(batch, height, width, out))


def conv_fused_and_separate(shape, seed):
    x, weight, bias, norm, residual = conv_operands(*shape, seed)
    conv = prim.bf16_conv3x3(x, weight, bias)
    return [("silu", prim.bf16_conv3x3(x, weight, bias, silu=True), prim.silu(conv)),
            ("norm", prim.bf16_conv3x3(x, weight, bias, norm=norm), prim.rms_norm_residual(conv, *norm)),
            ("norm + residual", prim.bf16_conv3x3(x, weight, None, norm=norm, residual=residual),
             prim.rms_norm_residual(prim.bf16_conv3x3(x, weight), *norm, residual))]


# sub-pixel upsamplers (batch, height, width, C, O): repeats 2 (the DC-AE's 256 -> 128), 4 (C = O) and 1 (C = 4 O)
SUBPIXEL_SHAPES = [(1, 5, 7, 32, 16), (2, 9, 4, 64, 64), (1, 6, 5, 128, 32), (1, 40, 44, 256, 128)]


def subpixel_fused_and_separate(shape, seed):
    """The node with the shortcut read from x, and with the same start made beforehand as its init."""
    batch, height, width, channels, out = shape
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((batch, height, width, channels)).astype(np.float32))
    weights = mx.array((rng.standard_normal((2, 2, out, 2, 2, channels)) * 0.1).astype(np.float32))
    bias = mx.array(rng.standard_normal(out).astype(np.float32))
    repeats = 4 * out // channels
    init = prim.subpixel_shortcut_reference(x, out, repeats) + bias
    return (prim.bf16_subpixel_conv(x, weights, bias=bias, repeats=repeats), prim.bf16_subpixel_conv(x, weights, init),
            prim.bf16_subpixel_conv_reference(x, weights, bias=bias, repeats=repeats))


# 4-bit layers (M, K, N, group size): N and M tails, every group size
Q4_SHAPES = [(1, 64, 40, 32), (9, 128, 33, 64), (79, 896, 100, 64), (40, 512, 64, 128)]


def q4_fused_and_separate(shape, seed):
    """The 4-bit node, mx.dequantize + the float bf16 node + the bias, and the weight's operands."""
    m, k, n, group_size = shape
    rng = np.random.default_rng(seed)
    w = mx.array((rng.standard_normal((n, k)) * 0.1).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=4)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    bias = mx.array(rng.standard_normal(n).astype(np.float32))
    dense = mx.dequantize(packed, scales, biases, group_size=group_size, bits=4)
    return (prim.bf16_matmul_q4(x, packed, scales, biases, group_size, bias), prim.bf16_matmul(x, dense.T) + bias,
            (x, packed, scales, biases, group_size, bias))


def mismatches() -> list[str]:
    """Every case whose fused output is not the separate nodes' bit for bit (run in each kernel's process)."""
    wrong = []
    for index, shape in enumerate(SHAPES):
        for what, fused, separate in fused_and_separate(operands(*shape, seed=70 + index)):
            if not same_bits(fused, separate):
                wrong.append(f"{shape} {what}")
    for index, shape in enumerate(CONV_SHAPES):
        for what, fused, separate in conv_fused_and_separate(shape, seed=80 + index):
            if not same_bits(fused, separate):
                wrong.append(f"conv {shape} {what}")
    for index, shape in enumerate(SUBPIXEL_SHAPES):
        fused, separate, _ = subpixel_fused_and_separate(shape, seed=60 + index)
        if not same_bits(fused, separate):
            wrong.append(f"subpixel {shape}")
    for index, shape in enumerate(Q4_SHAPES):
        fused, separate, _ = q4_fused_and_separate(shape, seed=50 + index)
        if not same_bits(fused, separate):
            wrong.append(f"q4 {shape}")
    return wrong


@pytest.mark.parametrize("index", range(len(SHAPES)), ids=lambda i: "x".join(map(str, SHAPES[i])))
def test_q8_extras_give_the_separate_nodes_bits(index):
    o = operands(*SHAPES[index], seed=70 + index)
    for what, fused, separate in fused_and_separate(o):
        assert node_names(fused) == {"MobileoBf16MatmulQ8"}, what
        assert fused.shape == separate.shape and same_bits(fused, separate), what


def test_q8_extras_on_the_register_tile_kernel():
    """The same bits with the AVX512-BF16 register tile (the kernel is chosen once per process)."""
    env = {**os.environ, "MOBILEO_MLX_BF16_GEMM": "avx512"}
    code = ("import json; from mobileo_mlx.kernels import primitives as p; from tests.test_gemm_extras import "
            "mismatches; print(json.dumps({'kernel': p.bf16_kernel(), 'wrong': mismatches()}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"kernel": "avx512-bf16", "wrong": []}


@pytest.mark.parametrize("index", [1, 4], ids=lambda i: "x".join(map(str, SHAPES[i])))
def test_q8_extras_against_the_twin_and_float64(index):
    o = operands(*SHAPES[index], seed=90 + index)
    a = {name: mx.array(value) for name, value in o.items()}
    norm = (a["shift"], a["scale"], EPS)
    got = prim.bf16_matmul_q8(a["x"], a["values"], a["scales"], a["biases"], 64, a["bias"], norm=norm,
                              residual=a["residual"], gate=a["gate"])
    twin = prim.bf16_matmul_q8_reference(a["x"], a["values"], a["scales"], a["biases"], 64, a["bias"], norm=norm,
                                         residual=a["residual"], gate=a["gate"])
    assert relative_error(got, twin) < 1e-6
    # float64 from the normalised rows (the norm node's, checked against float64 in test_elementwise)
    normed = np.array(prim.modulated_layer_norm(a["x"], a["shift"], a["scale"], EPS), dtype=np.float32)
    product = bf16_rounded(normed) @ bf16_rounded(q8_weight(o["values"], o["scales"], o["biases"]))
    exact = o["residual"].astype(np.float64) + o["gate"].astype(np.float64) * (product + o["bias"])
    assert relative_error(got, exact) < 1e-6


def test_q8_extras_build_lazily_and_never_write_their_inputs():
    o = operands(2, 20, 128, 48, seed=7)
    names = ("x", "values", "scales", "biases", "bias", "shift", "scale", "residual", "gate")
    built_lazily(lambda: [mx.array(o[name]) for name in names],
                 lambda x, v, s, b, row, shift, scale, residual, gate: prim.bf16_matmul_q8(
                     x, v, s, b, 64, row, norm=(shift, scale, EPS), residual=residual, gate=gate))
    a = {name: mx.array(o[name]) for name in names}
    first = prim.bf16_matmul_q8(a["x"], a["values"], a["scales"], a["biases"], 64, a["bias"], residual=a["residual"],
                                gate=a["gate"])
    mx.eval(first)
    assert same_bits(a["residual"], o["residual"]) and same_bits(a["x"], o["x"])  # held by us: not taken over
    donated = prim.bf16_matmul_q8(a["x"], a["values"], a["scales"], a["biases"], 64, a["bias"],
                                  residual=a["residual"] * 1.0, gate=a["gate"])  # a temporary: its buffer is taken
    assert same_bits(donated, first)


def test_what_the_extras_do_not_take_they_say():
    o = operands(2, 6, 64, 40, seed=8)
    a = {name: mx.array(value) for name, value in o.items()}
    weights = (a["values"], a["scales"], a["biases"], 64, a["bias"])
    norm = (a["shift"], a["scale"], EPS)
    assert prim.bf16_matmul_q8_supported(a["x"], *weights, norm=norm, residual=a["residual"], gate=a["gate"])
    assert not prim.bf16_matmul_q8_supported(a["x"], *weights, gate=a["gate"])  # a gate needs a residual
    assert not prim.bf16_matmul_q8_supported(a["x"], *weights, residual=a["residual"][:, :5])
    assert not prim.bf16_matmul_q8_supported(a["x"], *weights, norm=(a["shift"][..., :32], a["scale"], EPS))
    assert not prim.bf16_matmul_q8_supported(a["x"][None], *weights, norm=norm)  # rows of [B, N, K] only
    with pytest.raises(ValueError, match="gate needs a residual"):
        prim.bf16_matmul_q8(a["x"], *weights, gate=a["gate"])


@pytest.mark.parametrize("index", range(len(CONV_SHAPES)), ids=["tails", "batch 2", "tile pair groups"])
def test_conv_extras_give_the_separate_nodes_bits(index):
    """SiLU in the store, and the RMSNorm (+ bias, + residual) of each row once the GEMM has finished it."""
    for what, fused, separate in conv_fused_and_separate(CONV_SHAPES[index], seed=80 + index):
        assert node_names(fused) == {"MobileoBf16Conv"}, what
        assert same_bits(fused, separate), what


@pytest.mark.parametrize("index", range(len(SUBPIXEL_SHAPES)), ids=["repeats 2", "repeats 4", "repeats 1",
                                                                    "a band's size"])
def test_subpixel_shortcut_read_in_the_store_gives_the_init_paths_bits(index):
    """The upsampler's shortcut and bias read from x as the node stores give the bits of the same start
    made beforehand as the node's init, and the twin's values."""
    fused, separate, twin = subpixel_fused_and_separate(SUBPIXEL_SHAPES[index], seed=60 + index)
    assert same_bits(fused, separate)
    assert relative_error(fused, twin) < 1e-5


def test_what_the_subpixel_node_does_not_take_it_says():
    x, weights = mx.zeros((1, 4, 4, 32)), mx.zeros((2, 2, 16, 2, 2, 32))
    init, bias = mx.zeros((1, 8, 8, 16)), mx.zeros((16,))
    assert prim.bf16_subpixel_conv_supported(x, weights, bias=bias, repeats=2)
    assert not prim.bf16_subpixel_conv_supported(x, weights, bias=bias, repeats=4)  # C * repeats != 4 O
    assert not prim.bf16_subpixel_conv_supported(x, weights, init, repeats=2)  # the init or the shortcut
    assert not prim.bf16_subpixel_conv_supported(x, weights, init, bias=bias)  # a bias comes with the shortcut
    with pytest.raises(ValueError, match="init, or the shortcut"):
        prim.bf16_subpixel_conv(x, weights)


def test_conv_norm_against_its_twin():
    x, weight, bias, norm, residual = conv_operands(2, 12, 10, 32, 32, seed=5)
    got = prim.bf16_conv3x3(x, weight, None, norm=norm, residual=residual)
    assert relative_error(got, prim.bf16_conv3x3_reference(x, weight, None, norm=norm, residual=residual)) < 1e-5
    assert not prim.bf16_conv3x3_supported(x, weight, None, silu=True, norm=norm)  # one or the other
    assert not prim.bf16_conv3x3_supported(x, weight, None, residual=residual)  # a residual comes with the norm
    assert not prim.bf16_conv3x3_supported(x, weight, None, norm=(norm[0][:5], norm[1], 1e-5))
    with pytest.raises(ValueError, match="residual comes with the norm"):
        prim.bf16_conv3x3(x, weight, None, residual=residual)


@pytest.mark.parametrize("shape", [(1, 7, 9, 16, 24), (2, 20, 33, 40, 48)], ids=["tails", "batch 2"])
def test_conv_silu_gives_the_bits_of_the_silu_node(shape):
    batch, height, width, channels, out = shape
    rng = np.random.default_rng(sum(shape))
    x = mx.array(rng.standard_normal((batch, height, width, channels)).astype(np.float32))
    weight = mx.array((rng.standard_normal((out, 3, 3, channels)) * 0.2).astype(np.float32))
    bias = mx.array(rng.standard_normal(out).astype(np.float32))
    fused = prim.bf16_conv3x3(x, weight, bias, silu=True)
    assert node_names(fused) == {"MobileoBf16Conv"}
    assert same_bits(fused, prim.silu(prim.bf16_conv3x3(x, weight, bias)))
    assert relative_error(fused, prim.bf16_conv3x3_reference(x, weight, bias, silu=True)) < 1e-6
    init = mx.array(rng.standard_normal((batch, height, width, out)).astype(np.float32))
    assert same_bits(prim.bf16_conv(x, weight, bias, (1, 1), init=init, silu=True),
                     prim.silu(prim.bf16_conv(x, weight, bias, (1, 1), init=init)))


# ------------------------------------------------------------------------------- the CPU forms
def quantized_dit_block(seed: int = 3):
    """A SANA block (inner 64, cross-attention 64, Mix-FFN 160) with 8-bit layers, as a converted DiT holds them."""
    config = sana.SanaConfig(in_channels=8, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                             num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                             caption_channels=24, mlp_ratio=2.5)
    block = randomized(sana.SanaTransformerBlock(config), seed=seed, scale=0.2)
    nn.quantize(block, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    return config, block


def block_inputs(config, batch: int, seed: int = 11):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    dim, height, width = config.inner_dim, 4, 6
    heads, depth = config.num_cross_attention_heads, config.cross_attention_head_dim
    key_bias = mx.array(np.where(np.arange(9) < 7, 0.0, -10000.0).astype(np.float32))[None, None, None]
    return (normal(batch, height * width, dim), height, width, normal(batch, 6, dim) * 0.3,
            normal(batch, heads, 9, depth), normal(batch, heads, 9, depth), key_bias)


@pytest.mark.parametrize("batch", [1, 2])
def test_sana_block_fuses_its_element_wise_work_into_its_products_bit_for_bit(batch, monkeypatch):
    """With bf16 products and 8-bit weights every product is the GEMM node and the block is six of them
    (q, k, v one product): no separate norm or residual node, and the bits of the separate nodes."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    config, plain = quantized_dit_block()
    fast = backends.accelerate(rebuild(plain), "dit", matmul="bf16")
    assert type(fast) is layers.SanaTransformerBlock and fast._qkv is not None
    inputs = block_inputs(config, batch)
    fused = fast(*inputs)
    names = node_names(fused)
    assert "MobileoBf16MatmulQ8" in names and not names & {"MobileoModulatedLayerNorm", "MobileoGatedResidual"}
    dot = io.StringIO()
    mx.export_to_dot(dot, fused)
    assert dot.getvalue().count('"MobileoBf16MatmulQ8"') == 6
    monkeypatch.setattr(layers.SanaTransformerBlock, "_fused_products", lambda self, x: None)
    separate = fast(*inputs)
    assert {"MobileoModulatedLayerNorm", "MobileoGatedResidual"} <= node_names(separate)
    assert same_bits(fused, separate)
    assert relative_error(fused, plain(*inputs)) < 2e-2  # bf16 products against the float32 block


def test_the_fused_q_k_v_weights_are_held_once_and_follow_an_update(monkeypatch):
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    config, plain = quantized_dit_block(seed=4)
    originals = [np.array(layer.weight) for layer in (plain.attn1.to_q, plain.attn1.to_k, plain.attn1.to_v)]
    fast = backends.accelerate(rebuild(plain), "dit", matmul="bf16")
    values = np.array(fast._qkv.operands[0])
    for index, (layer, original) in enumerate(zip((fast.attn1.to_q, fast.attn1.to_k, fast.attn1.to_v), originals)):
        inner = original.shape[0]
        assert same_bits(layer.weight, values[:, index * inner:(index + 1) * inner])  # K-major views of the one copy
        assert np.array_equal(np.array(layer.weight), original.view(np.uint8).T)
    backends.accelerate(fast, "dit", matmul="bf16")  # idempotent: not fused twice
    assert np.array_equal(np.array(fast._qkv.operands[0]), values)
    _, other = quantized_dit_block(seed=5)  # new weights for to_k: the block lays them side by side again
    replacement = backends.accelerate(rebuild(other), "dit", matmul="bf16").attn1.to_k
    fast.attn1.to_k.update({name: mx.array(np.array(replacement[name])) for name in ("weight", "scales", "biases")})
    inputs = block_inputs(config, 2)
    fused = fast(*inputs)
    monkeypatch.setattr(layers.SanaTransformerBlock, "_fused_products", lambda self, x: None)
    assert same_bits(fused, fast(*inputs))


def test_dcae_resblock_is_two_conv_nodes_with_the_separate_nodes_bits(monkeypatch):
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    block = randomized(dcae.ResBlock(32, 32, "rms_norm", "silu"), seed=6, scale=0.2)
    fast = backends.accelerate(rebuild(block), "vae", matmul="bf16")
    x = mx.array(np.random.default_rng(9).standard_normal((2, 7, 9, 32)).astype(np.float32))
    out = fast(x)
    assert node_names(out) == {"MobileoBf16Conv"}  # no separate SiLU, no separate norm
    h = prim.silu(prim.bf16_conv3x3(x, block.conv1.weight, block.conv1.bias))
    separate = prim.rms_norm_residual(prim.bf16_conv3x3(h, block.conv2.weight), block.norm.weight, block.norm.bias,
                                      block.norm.eps, x)
    assert same_bits(out, separate)


@pytest.mark.parametrize("size", [(5, 7), (2, 3)], ids=["linear attention", "quadratic (N <= d)"])
def test_litemla_with_its_q_k_v_as_one_product_gives_the_plain_forms_bits(size, monkeypatch):
    """The DC-AE's LiteMLA (8-bit q, k, v, bf16 products): q, k, v one product, the attention of the direct and
    the multiscale heads taken apart, norm_out with the residual: the bits of the plain form's path."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    monkeypatch.setattr(tuning, "GROUPED_POINTWISE_NATIVE_MIN_MACS", 0)
    plain = randomized(dcae.SanaMultiscaleLinearAttention(64, 16, (5,), "rms_norm"), seed=12, scale=0.2)
    nn.quantize(plain, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    fast = backends.accelerate(rebuild(plain), "vae", matmul="bf16")
    assert type(fast) is layers.SanaMultiscaleLinearAttention and fast._qkv is not None
    x = mx.array(np.random.default_rng(13).standard_normal((2, *size, 64)).astype(np.float32))
    out = fast(x)
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    assert dot.getvalue().count('"MobileoBf16MatmulQ8"') == 2  # q, k, v as one product, and to_out
    assert same_bits(out, dcae.SanaMultiscaleLinearAttention.__call__(fast, x))  # the plain form's path
    assert relative_error(out, plain(x)) < 2e-2  # bf16 products against the float32 module


@pytest.mark.parametrize("index", range(len(Q4_SHAPES)), ids=lambda i: "x".join(map(str, Q4_SHAPES[i])))
def test_the_4bit_node_gives_the_dequantized_products_bits(index):
    fused, separate, operands = q4_fused_and_separate(Q4_SHAPES[index], seed=50 + index)
    assert "MobileoBf16MatmulQ4" in _dot(fused)
    assert same_bits(fused, separate)
    assert relative_error(fused, prim.bf16_matmul_q4_reference(*operands)) < 1e-6
    x, packed, scales, biases, group_size, bias = operands
    dense = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=4), dtype=np.float32)
    exact = bf16_rounded(np.array(x)) @ bf16_rounded(dense.T) + np.array(bias, dtype=np.float64)
    assert relative_error(fused, exact) < 1e-6


def test_the_4bit_node_builds_lazily_and_says_what_it_does_not_take():
    _, _, (x, packed, scales, biases, group_size, bias) = q4_fused_and_separate((9, 128, 33, 64), seed=3)
    built_lazily(lambda: [x, packed, scales, biases, bias],
                 lambda a, p, s, b, row: prim.bf16_matmul_q4(a, p, s, b, 64, row))
    assert prim.bf16_matmul_q4_supported(x, packed, scales, biases, 64, bias)
    assert not prim.bf16_matmul_q4_supported(x, packed, scales, biases, 32, bias)  # not its group size
    assert not prim.bf16_matmul_q4_supported(x[:, :64], packed, scales, biases, 64, bias)
    assert not prim.bf16_matmul_q4_supported(x, packed.astype(mx.int32), scales, biases, 64, bias)
    with pytest.raises(ValueError, match="scales and biases"):
        prim.bf16_matmul_q4(x, packed, scales, biases, 32)


def test_the_language_models_4bit_layers_take_the_node_only_while_encoding(monkeypatch):
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    linear = randomized(nn.Linear(128, 96), seed=14)
    layer = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
    fast = backends.accelerate(nn.Sequential(layer), "language", matmul="bf16").layers[0]
    x = mx.array(np.random.default_rng(15).standard_normal((20, 128)).astype(np.float32))
    answering = fast(x)
    assert "MobileoBf16MatmulQ4" not in _dot(answering)
    with backends.stage(encoding=True):
        encoding = fast(x)
    assert "MobileoBf16MatmulQ4" in _dot(encoding)
    dense = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4)
    assert same_bits(encoding, prim.bf16_matmul(x, dense.T) + layer.bias)


def _dot(*outputs) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue()
