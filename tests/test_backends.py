"""The backend seam (mobileo_mlx.backends): swap() and accelerate(), MOBILEO_MLX_KERNELS,
the choice of CPU matmul precision, the stage context, and every CPU form against the plain
module it replaces (bit for bit where the computation is the same)."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache

from mobileo_mlx import backends, platform
from mobileo_mlx.backends import tuning
from mobileo_mlx.backends.cpu import layers, quantized, streams
from mobileo_mlx.kernels import primitives
from mobileo_mlx.models import build, common, dcae, fastvit, sana
from mobileo_mlx.models.language import LanguageConfig, LanguageModel
from tests.helpers import relative_error

on_cpu = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's forms")
needs_bf16 = pytest.mark.skipif(backends.bf16_unavailable_reason() is not None,
                                reason=f"bf16 CPU matmuls unavailable here: {backends.bf16_unavailable_reason()}")
NODES = ("MobileoGelu", "MobileoDepthwiseConv2d", "MobileoQuantizedGemv", "MobileoBf16Matmul", "MobileoBf16MatmulQ8",
         "MobileoBf16Conv", "MobileoBf16SubpixelConv")

# Small configs of every component.
SMALL_CONFIGS = {
    "vision": dict(image_size=128, widths=[8, 16, 16, 32, 32], depths=[1, 1, 1, 1, 1], mm_hidden_size=64,
                   se_width=8, head_dim=8),
    "language": dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100),
    "mcp": dict(hidden_size=32, compress_dim=16, output_dim=24, kernel_size=3),
    "dit": dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24),
    "vae": dict(latent_channels=4, block_out_channels=[8, 16, 32], block_types=["ResBlock", "ResBlock",
                "EfficientViTBlock"], layers_per_block=[1, 1, 1], qkv_multiscales=[[], [], [5]], attention_head_dim=8),
}


def randomized(module, seed: int = 0, scale: float = 0.3):
    params = [(k, mx.random.normal(v.shape, key=mx.random.key(seed + i)) * scale)
              for i, (k, v) in enumerate(tree_flatten(module.parameters()))]
    module.update(tree_unflatten(params))
    return module


def same_bits(a, b) -> bool:
    a, b = np.array(a), np.array(b)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def nodes(*outputs) -> set[str]:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return {name for name in NODES if f'"{name}"' in dot.getvalue()}


def rebuild(module):
    """A fresh module of the same structure holding the same parameter arrays."""
    import copy

    clone = copy.deepcopy(module)
    clone.update(module.parameters())
    return clone


# ---------------------------------------------------------------------------------------- swap
class Doubling(nn.Linear):
    prepared = 0

    def prepare(self):
        type(self).prepared += 1

    def __call__(self, x):
        return 2 * super().__call__(x)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.direct = nn.Linear(4, 4)
        self.listed = [nn.Linear(4, 4), [nn.Linear(4, 4)]]
        self.keyed = {"a": nn.Linear(4, 4)}
        self.other = nn.QuantizedLinear(64, 4, group_size=64, bits=4)


def test_swap_replaces_exact_types_everywhere_and_shares_parameters():
    holder = Holder()
    weight = holder.direct.weight
    Doubling.prepared = 0
    swapped = backends.swap(holder, {nn.Linear: Doubling})
    assert swapped is holder  # the top module itself is not in the table: updated in place
    linears = [holder.direct, holder.listed[0], holder.listed[1][0], holder.keyed["a"]]
    assert all(type(m) is Doubling for m in linears) and Doubling.prepared == 4
    assert holder.direct.weight is weight  # the very same arrays
    assert type(holder.other) is nn.QuantizedLinear
    x = mx.ones((1, 4))
    assert mx.array_equal(holder.direct(x), 2 * nn.Linear.__call__(holder.direct, x)).item()
    backends.swap(holder, {nn.Linear: Doubling})  # a subclass is not an exact match: nothing again
    assert Doubling.prepared == 4
    assert set(dict(tree_flatten(holder.parameters()))) == set(dict(tree_flatten(Holder().parameters())))


def test_swap_of_the_top_module_returns_the_new_one():
    linear = nn.Linear(3, 2)
    fast = backends.swap(linear, {nn.Linear: Doubling})
    assert type(fast) is Doubling and fast.weight is linear.weight and type(linear) is nn.Linear


@on_cpu
@pytest.mark.parametrize("component", ["vision", "language", "mcp", "dit", "vae"])
def test_accelerate_is_idempotent(component):
    model = backends.accelerate(build(component, SMALL_CONFIGS[component]), component)
    types = [type(m) for _, m in model.named_modules()]
    again = backends.accelerate(model, component)
    assert again is model and [type(m) for _, m in model.named_modules()] == types




# ------------------------------------------------------------------------------- kernels mode
def test_kernels_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(backends.KERNELS_ENV, raising=False)
    assert backends.kernels_mode() == "auto"
    for mode in backends.KERNELS_MODES:
        monkeypatch.setenv(backends.KERNELS_ENV, f" {mode.upper()} ")
        assert backends.kernels_mode() == mode
    monkeypatch.setenv(backends.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="MOBILEO_MLX_KERNELS='fast'"):
        backends.kernels_mode()


@on_cpu
@pytest.mark.parametrize("mode", backends.KERNELS_MODES)
def test_kernels_modes_reference_twin_auto(mode, monkeypatch):
    """reference: the plain model; twin: the CPU forms with the plain-MLX twin of every native
    kernel (no graph node of ours); auto: the native kernels too."""
    monkeypatch.setenv(backends.KERNELS_ENV, mode)
    config = fastvit.FastViTConfig(**SMALL_CONFIGS["vision"])
    plain = randomized(fastvit.FastViTHD(config), seed=1, scale=0.2)
    model = backends.accelerate(rebuild(plain), "vision")
    assert isinstance(model.act, layers.GELU) == (mode != "reference")
    pixels = mx.random.uniform(shape=(1, 128, 128, 3), key=mx.random.key(2))
    out = model(pixels)
    kinds = nodes(out)
    if mode == "auto" and primitives.available():
        assert "MobileoGelu" in kinds
    else:
        assert not kinds
    assert relative_error(out, plain(pixels)) < 1e-4


# ------------------------------------------------------------------------------ matmul choice
def test_cpu_matmul_choice(monkeypatch):
    monkeypatch.delenv(backends.MATMUL_ENV, raising=False)
    available = backends.bf16_unavailable_reason() is None
    assert backends.resolve_cpu_matmul("fp32") == "fp32"
    assert backends.resolve_cpu_matmul("auto") == ("bf16" if available else "fp32")
    monkeypatch.setenv(backends.MATMUL_ENV, "fp32")
    assert backends.resolve_cpu_matmul() == "fp32"
    assert backends.resolve_cpu_matmul("auto") == ("bf16" if available else "fp32")  # the argument wins
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
        backends.resolve_cpu_matmul("fp8")
    monkeypatch.setattr(backends, "bf16_unavailable_reason", lambda: "this CPU has no AVX512-BF16")
    assert backends.resolve_cpu_matmul("auto") == "fp32"
    with pytest.raises(ValueError, match="no AVX512-BF16"):
        backends.resolve_cpu_matmul("bf16")
    with pytest.raises(ValueError, match="matmul"):
        backends.accelerate(nn.Linear(2, 2), "dit", matmul="fp16")


# ------------------------------------------------------------------------------ stage context
def test_stage_raises_the_buffer_cache_for_one_stage_and_restores_it():
    previous = mx.set_cache_limit(32 << 20)
    try:
        with backends.stage(64 << 20):
            inside = mx.set_cache_limit(64 << 20)
        after = mx.set_cache_limit(32 << 20)
        assert inside == ((64 << 20) if platform.backend() == "cpu" else (32 << 20))
        assert after == 32 << 20 and mx.get_cache_memory() == 0 or platform.backend() != "cpu"
        with backends.stage(16 << 20):  # never lowers it
            assert mx.set_cache_limit(32 << 20) == 32 << 20
    finally:
        mx.set_cache_limit(previous)


@on_cpu
@needs_bf16
def test_language_products_take_bf16_only_while_a_stage_encodes(monkeypatch):
    """The language model accelerated with bf16 matmuls multiplies in bfloat16 inside an encoding
    stage only: float32 outside any stage, in a stage that answers, and in another thread (a
    server's chat beside an encoding generation)."""
    import threading

    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    reference = nn.QuantizedLinear.from_linear(randomized(nn.Linear(128, 64), seed=8), group_size=64, bits=4)
    holder = nn.Sequential(reference)
    language = backends.accelerate(rebuild(holder), "language", matmul="bf16").layers[0]
    assert type(language) is quantized.EncodingQuantizedLinear
    fp32 = backends.accelerate(rebuild(holder), "language", matmul="fp32").layers[0]
    x = mx.random.normal((12, 128), key=mx.random.key(9))
    float32 = fp32(x)
    assert relative_error(float32, reference(x)) < 1e-5
    seen_elsewhere = []
    assert same_bits(language(x), float32)
    with backends.stage(encoding=True):
        encoded = language(x)
        worker = threading.Thread(target=lambda: seen_elsewhere.append(same_bits(language(x), float32)))
        worker.start()
        worker.join()
        with backends.stage():
            assert same_bits(language(x), float32)
    assert seen_elsewhere == [True]
    assert 0 < relative_error(encoded, float32) < 1e-2
    weight = quantized.dequantize(reference.weight, reference.scales, reference.biases, 4, 64)
    assert relative_error(encoded, primitives.bf16_matmul_reference(x, weight.T) + reference.bias) < 1e-6
    assert same_bits(language(x), float32)
    with backends.stage(encoding=True):  # with fp32 matmuls: float32 in every stage
        assert same_bits(fp32(x), float32)


@on_cpu
def test_cpu_pieces_compute_each_piece_once_and_do_not_nest():
    x = mx.arange(12, dtype=mx.float32).reshape(4, 3)
    seen = []

    def piece(i):
        seen.append(streams.may_split())
        inner = streams.cpu_pieces(2, lambda j: x[2 * i + j] * 2)  # nested: built in order
        return mx.stack(inner)

    pieces = streams.cpu_pieces(2, piece)
    assert np.array_equal(np.array(mx.concatenate(pieces)), np.array(x) * 2)
    assert seen == [False, False]
    assert streams.may_split()
    halves = streams.split_in_two(lambda part: x[part] * 3, 4, axis=0)
    assert np.array_equal(np.array(halves), np.array(x) * 3)


# ------------------------------------------------------------------- CPU forms against plain
@on_cpu
@pytest.mark.parametrize("batch", [1, 2])
def test_glumbconv_cpu_form_matches_the_plain_module(batch):
    """The gated middle in two pieces (the CFG pair's halves, or channel halves): the fast SiLU
    differs from MLX's in the last bits only."""
    for plain in (sana.GLUMBConv(16, 16, 2.5, None, False), sana.GLUMBConv(16, 16, 4, "rms_norm", True)):
        randomized(plain, seed=3)
        x = mx.random.normal((batch, 6, 5, 16), key=mx.random.key(9))
        fast = backends.accelerate(rebuild(plain), "dit")
        assert type(fast) is layers.GLUMBConv
        assert relative_error(fast(x), plain(x)) < 1e-5


@on_cpu
@pytest.mark.parametrize("batch", [1, 2])
def test_glumbconv_cpu_form_takes_the_gated_node_and_computes_its_mlx_form(batch, monkeypatch):
    """SANA's GLUMBConv and the DC-AE's (RMSNorm, residual): the middle is one native node where
    C is a multiple of 8, bit for bit the MLX form the twin mode runs; other widths run that form."""
    x = mx.random.normal((batch, 7, 5, 16), key=mx.random.key(10))
    for plain, node in ((sana.GLUMBConv(16, 16, 2.5, None, False), True),  # C = 40
                        (sana.GLUMBConv(16, 16, 4, "rms_norm", True), True),  # C = 64
                        (sana.GLUMBConv(16, 16, 2.25, "rms_norm", True), False)):  # C = 36
        randomized(plain, seed=4)
        fast = backends.accelerate(rebuild(plain), "vae")
        y = fast(x)
        graph = io.StringIO()
        mx.export_to_dot(graph, y)
        assert ('"MobileoGatedDepthwise"' in graph.getvalue()) == (node and primitives.available())
        assert relative_error(y, plain(x)) < 1e-5
        with monkeypatch.context() as patch:
            patch.setenv("MOBILEO_MLX_KERNELS", "twin")
            assert same_bits(fast(x), y)


@on_cpu
@pytest.mark.parametrize("batch", [1, 2])
def test_fastvit_multiplier_convs_take_one_native_conv_per_output_phase(batch, monkeypatch):
    """FastViT's downsampler (7x7, stride 2, two output channels per input channel) and ``conv_exp``
    (3x3, two per input): one native depthwise conv per output phase, interleaved, as the plain
    module computes them (odd sizes: the kernel's border paths)."""
    monkeypatch.setattr(tuning, "DEPTHWISE_NATIVE_MIN_MACS", 0)
    cases = ((fastvit.Downsample(16, 32, 7), (batch, 19, 13, 16)),
             (fastvit.ConvExpansion(24, 48, 3, 8), (batch, 9, 11, 24)))
    for seed, (plain, shape) in enumerate(cases):
        randomized(plain, seed=seed)
        x = mx.random.normal(shape, key=mx.random.key(20 + seed))
        fast = backends.accelerate(rebuild(plain), "vision")
        assert type(fast.conv) is layers.DepthwiseConv
        y = fast(x)
        if primitives.available():
            assert nodes(y) == {"MobileoDepthwiseConv2d", "MobileoGelu"}
        assert relative_error(y, plain(x)) < 1e-5
        conv = fast.conv
        phases = [primitives.depthwise_conv2d(x, conv.weight[j::2], conv.bias[j::2], conv.stride, conv.padding)
                  for j in range(2)] if primitives.available() else []
        for j, phase in enumerate(phases):  # output channels j, j + 2, ...: the node's own bits
            assert same_bits(conv(x)[..., j::2], phase)
        with monkeypatch.context() as patch:  # the twin: the shift-and-add conv
            patch.setenv("MOBILEO_MLX_KERNELS", "twin")
            assert not nodes(conv(x)) and relative_error(conv(x), plain.conv(x)) < 1e-5


@on_cpu
def test_fastvit_block_forms_fuse_the_layer_scaled_residual_bit_for_bit():
    config = fastvit.FastViTConfig(**SMALL_CONFIGS["vision"])
    for seed, (plain, shape) in enumerate(((fastvit.RepMixerBlock(16, 64, config), (2, 9, 7, 16)),
                                           (fastvit.AttentionBlock(16, 64, config), (1, 5, 6, 16)))):
        randomized(plain, seed=seed)
        x = mx.random.normal(shape, key=mx.random.key(30 + seed))
        fast = backends.accelerate(rebuild(plain), "vision")
        assert type(fast) is getattr(layers, type(plain).__name__)
        # the same sub-modules through the plain block's own __call__: the same bits
        assert same_bits(fast(x), type(plain).__call__(fast, x))
        assert relative_error(fast(x), plain(x)) < 1e-5


@on_cpu
@pytest.mark.parametrize("matmul", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_fastvit_ffn_bands_give_the_bits_of_the_whole_map(matmul, monkeypatch):
    """The FFN and residual of a large map in row bands (a partial band at the end, batch 1 and 2):
    the bf16 node computes every row of a product as in one call, so the same bits; OpenBLAS's
    float32 GEMM may sum a short product in another order."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    config = fastvit.FastViTConfig(**SMALL_CONFIGS["vision"])
    for seed, (plain, shape) in enumerate(((fastvit.RepMixerBlock(16, 64, config), (2, 9, 7, 16)),
                                           (fastvit.AttentionBlock(16, 64, config), (1, 5, 6, 16)))):
        randomized(plain, seed=seed)
        fast = backends.accelerate(rebuild(plain), "vision", matmul=matmul)
        x = mx.random.normal(shape, key=mx.random.key(40 + seed))
        whole = fast(x)
        monkeypatch.setattr(tuning, "FFN_BAND_MIN_VALUES", 0)
        monkeypatch.setattr(tuning, "FFN_BAND_ROWS", 8)
        banded = fast(x)
        graph = io.StringIO()
        mx.export_to_dot(graph, banded)
        assert graph.getvalue().count('"Concatenate"') >= 1  # the bands were built
        if matmul == "bf16":
            assert same_bits(banded, whole)
        assert relative_error(banded, whole) < 1e-6
        monkeypatch.setattr(tuning, "FFN_BAND_MIN_VALUES", 1 << 24)


@on_cpu
def test_dcae_cpu_forms_match_the_plain_modules():
    x = mx.random.normal((2, 6, 5, 64), key=mx.random.key(11))
    for plain in (dcae.ResBlock(64, 64, "rms_norm", "silu"), dcae.ResBlock(64, 64, "rms_norm", "gelu"),
                  dcae.EfficientViTBlock(64, 16, (5,), "rms_norm")):
        randomized(plain, seed=3, scale=0.2)
        fast = backends.accelerate(rebuild(plain), "vae")
        assert type(fast) is not type(plain) or isinstance(plain, dcae.EfficientViTBlock)
        assert relative_error(fast(x), plain(x)) < 1e-5


@on_cpu
def test_dcae_cpu_convolutions_match_mlx():
    x = mx.random.normal((2, 7, 6, 24), key=mx.random.key(12))
    weight = mx.random.normal((16, 3, 3, 24), key=mx.random.key(13)) * 0.2
    bias = mx.random.normal((16,), key=mx.random.key(14))
    assert relative_error(layers.conv3x3(x, weight, bias), mx.conv2d(x, weight, padding=1) + bias) < 1e-5
    strided = backends.accelerate(nn.Conv2d(24, 16, 3, stride=2, padding=1), "vae")
    assert type(strided) is layers.Conv2d
    assert mx.array_equal(strided(x), nn.Conv2d.__call__(strided, x)).item()  # not a 3x3 / stride 1: MLX's
    for cin, cout in [(24, 12), (24, 24), (24, 48), (24, 96)]:  # shortcut repeats 2, 4, 8, 16
        plain = randomized(dcae.DCUpBlock2d(cin, cout, True), seed=cout, scale=0.2)
        fast = backends.accelerate(rebuild(plain), "vae")
        assert type(fast) is layers.DCUpBlock2d
        out = fast(x)
        assert out.shape == (2, 14, 12, cout)
        assert relative_error(out, plain(x)) < 1e-5
    fast.conv.weight = fast.conv.weight * 2  # new weights: the combined taps follow
    plain.conv.weight = fast.conv.weight
    assert relative_error(fast(x), plain(x)) < 1e-5
    config = dcae.DCAEDecoderConfig(block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1),
                                    block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                                    qkv_multiscales=((), (), (5,)), latent_channels=4, attention_head_dim=8)
    plain = randomized(dcae.DCAEDecoder(config), seed=5, scale=0.2)
    latents = mx.random.normal((1, 3, 2, 4), key=mx.random.key(15))
    assert relative_error(backends.accelerate(rebuild(plain), "vae")(latents), plain(latents)) < 1e-4


@on_cpu
def test_attention_cpu_forms_match_the_plain_modules():
    q, k, v = (mx.random.normal((2, 4, n, 16), key=mx.random.key(i)) for i, n in enumerate((30, 20, 20)))
    mask = mx.array(np.where(np.arange(20) < 12, 0.0, -10000.0).astype(np.float32))[None, None, None]
    plain = common.ScaledDotProductAttention()
    fast = backends.accelerate(common.ScaledDotProductAttention(), "dit")
    assert type(fast) is layers.ScaledDotProductAttention
    assert relative_error(fast(q, k, v, 0.25, mask), plain(q, k, v, 0.25, mask)) < 1e-5
    linear = backends.accelerate(common.ReLULinearAttention(1e-15), "dit")
    assert same_bits(linear(q, k, v), common.ReLULinearAttention(1e-15)(q, k, v))


@on_cpu
def test_qwen2_cpu_forms_match_mlx_lm(monkeypatch):
    """The fast SiLU gate and prefill attention against mlx-lm's own modules: a whole prefill
    with its causal mask, a chunked prefill through a KV cache, and the masks mlx-lm passes."""
    config = LanguageConfig(**SMALL_CONFIGS["language"])
    plain = randomized(LanguageModel(config), seed=4, scale=0.2)
    fast = backends.accelerate(rebuild(plain), "language")
    assert type(fast.model.layers[0].mlp) is layers.Qwen2MLP
    assert type(fast.model.layers[0].self_attn) is layers.Qwen2Attention
    ids = mx.array([[5, 17, 3, 99, 42, 7, 7, 1, 60, 33, 2]])
    assert relative_error(fast(ids), plain(ids)) < 1e-5
    caches = make_prompt_cache(fast), make_prompt_cache(plain)
    for chunk in (ids[:, :4], ids[:, 4:9], ids[:, 9:10]):  # several rows, then one (decoding)
        got, want = fast(chunk, cache=caches[0]), plain(chunk, cache=caches[1])
        assert relative_error(got, want) < 1e-5
    x = mx.random.normal((2, 6, config.hidden_size), key=mx.random.key(8))
    attention = fast.model.layers[0].self_attn
    keep = mx.array([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    for mask in ("causal", keep, mx.where(keep, 0.0, -1e9)):
        assert relative_error(attention(x, mask), qwen2.Attention.__call__(attention, x, mask)) < 1e-5
    monkeypatch.setattr(tuning, "LANGUAGE_ATTENTION_MAX_SCORES", 1)  # long prompts: mlx-lm's call
    assert same_bits(attention(x, "causal"), qwen2.Attention.__call__(attention, x, "causal"))


# ------------------------------------------------------------------------------ quantized forms
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_dequantize_is_mlx_dequantize(bits):
    w = mx.random.normal((3, 5, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    assert mx.array_equal(quantized.dequantize(packed, scales, biases, bits, 32),
                          mx.dequantize(packed, scales, biases, group_size=32, bits=bits))


@on_cpu
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cpu_forms_match_mlx_quantized_layers(bits):
    reference = nn.QuantizedLinear.from_linear(nn.Linear(128, 48), group_size=64, bits=bits)
    layer = backends.accelerate(rebuild(reference), "language")
    assert type(layer) is quantized.QuantizedLinear
    for rows in (1, 8, 9, 40):
        x = mx.random.normal((rows, 128), key=mx.random.key(rows))
        assert relative_error(layer(x), reference(x)) < 1e-5
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(50, 64), group_size=64, bits=bits)
    fast = backends.accelerate(rebuild(embedding), "language")
    assert type(fast) is quantized.QuantizedEmbedding
    ids = mx.array([[0, 7, 49]])
    assert mx.array_equal(fast(ids), embedding(ids)).item()
    x = mx.random.normal((12, 64), key=mx.random.key(1))
    assert relative_error(fast.as_linear(x), embedding.as_linear(x)) < 1e-5


def _wide_4bit_layer(outputs: int):
    reference = nn.QuantizedLinear.from_linear(nn.Linear(128, outputs), group_size=64, bits=4)
    return reference, backends.accelerate(rebuild(reference), "language")


def _record_streams(monkeypatch, name: str) -> list:
    """Replace quantized.<name> by a wrapper that records the stream each call runs on."""
    found, real = [], getattr(quantized, name)
    monkeypatch.setattr(quantized, name,
                        lambda *args: found.append(str(mx.default_stream(mx.default_device()))) or real(*args))
    return found


@on_cpu
@pytest.mark.parametrize("outputs", [tuning.SPLIT_MIN_WEIGHTS // 128, 2 * tuning.SPLIT_MIN_WEIGHTS // 128 + 3])
def test_wide_layers_split_over_two_cpu_streams_give_the_same_result(outputs, monkeypatch):
    """Few rows through a wide quantized layer (token-by-token decoding) without the native
    kernel: the output columns are computed in two halves on two streams, equal to one
    quantized_matmul."""
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")  # MLX's quantized_matmul, not the GEMV node
    reference, layer = _wide_4bit_layer(outputs)
    found = _record_streams(monkeypatch, "_quantized_matmul")
    for rows in (1, 3):
        x = mx.random.normal((1, rows, 128), key=mx.random.key(rows))
        expected = mx.quantized_matmul(x, reference.weight, reference.scales, reference.biases,
                                       group_size=64, bits=4) + reference.bias
        assert mx.allclose(layer(x), expected, rtol=0, atol=1e-6).item()
    assert len(found) == 4 and len(set(found)) == 2


@on_cpu
@pytest.mark.parametrize("outputs", [tuning.SPLIT_MIN_WEIGHTS // 128, 2 * tuning.SPLIT_MIN_WEIGHTS // 128 + 3])
def test_prefill_rows_dequantize_in_two_halves_on_two_cpu_streams(outputs, monkeypatch):
    """Without the dequantize node (twin mode, or no extension), a few dozen rows (a prompt's
    prefill) through a wide quantized layer: the weight is dequantized in two halves on two
    streams, then multiplied: the same products as one dequantize + matmul. (The node uses
    every core by itself: tests/test_primitives.py.)"""
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    reference, layer = _wide_4bit_layer(outputs)
    real = quantized.dequantize
    found = _record_streams(monkeypatch, "dequantize")
    for rows, halves in ((9, True), (tuning.SPLIT_DEQUANTIZE_MAX_ROWS, True),
                         (tuning.SPLIT_DEQUANTIZE_MAX_ROWS + 1, False)):
        found.clear()
        x = mx.random.normal((1, rows, 128), key=mx.random.key(rows))
        whole = real(reference.weight, reference.scales, reference.biases, 4, 64)
        assert mx.allclose(layer(x), x @ whole.T + reference.bias, rtol=1e-6, atol=1e-6).item()
        assert len(found) == (2 if halves else 1) and len(set(found)) == len(found), (rows, found)


@on_cpu
def test_few_rows_take_the_gemv_node(monkeypatch):
    reference, layer = _wide_4bit_layer(600)
    x = mx.random.normal((1, 8, 128), key=mx.random.key(3))
    assert ("MobileoQuantizedGemv" in nodes(layer(x))) == primitives.available()
    assert "MobileoQuantizedGemv" not in nodes(layer(mx.concatenate([x, x], axis=1)))  # 16 rows
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    assert not nodes(layer(x))
    assert relative_error(layer(x), reference(x)) < 1e-5


@on_cpu
def test_k_major_storage_gives_the_same_products():
    """8-bit layers of the DiT and the VAE stored K-major: the same weights, dequantized in
    another layout, so the same result for any number of rows; other widths stay as they were."""
    reference = nn.QuantizedLinear.from_linear(nn.Linear(192, 80), group_size=64, bits=8)
    four_bit = nn.QuantizedLinear.from_linear(nn.Linear(192, 80, bias=False), group_size=64, bits=4)
    holder = nn.Module()
    holder.layers = [rebuild(reference), rebuild(four_bit)]
    xs = [mx.random.normal((rows, 192), key=mx.random.key(rows)) for rows in (1, 8, 9, 300, 600)]
    before = [reference(x) for x in xs]
    backends.accelerate(holder, "dit")
    layer, other = holder.layers
    assert type(layer) is quantized.KMajorQuantizedLinear and layer.k_major
    assert layer.weight.shape == (192, 80) and layer.weight.dtype == mx.uint8
    assert not other.k_major and other.weight.shape == four_bit.weight.shape
    assert "input_dims=192, output_dims=80" in repr(layer) and "k_major" in repr(layer)
    for x, expected in zip(xs, before):
        assert relative_error(layer(x), expected) < 1e-5
    dense = quantized.dequantize(reference.weight, reference.scales, reference.biases, 8, 64)
    assert mx.array_equal(quantized.dequantize_k_major(layer.weight, layer.scales, layer.biases, 64), dense.T).item()
    backends.accelerate(holder, "dit")  # idempotent: transposed once
    assert layer.weight.shape == (192, 80)


# ------------------------------------------------------------------------------- bf16 forms
@on_cpu
@needs_bf16
def test_bf16_forms_round_the_operands_of_their_products(monkeypatch):
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    linear = randomized(nn.Linear(64, 48), seed=5)
    fast = backends.accelerate(rebuild(linear), "dit", matmul="bf16")
    assert type(fast) is layers.Bf16Linear
    x = mx.random.normal((30, 64), key=mx.random.key(6))
    twin = primitives.bf16_matmul_reference(x, linear.weight.T, linear.bias)
    out = fast(x)
    assert nodes(out) == {"MobileoBf16Matmul"}
    assert relative_error(out, twin) < 1e-6 and relative_error(out, linear(x)) > 1e-5
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    assert same_bits(fast(x), twin)
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 30 * 64 * 48 + 1)  # small products stay float32
    assert same_bits(fast(x), linear(x))


@on_cpu
@needs_bf16
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_bf16_k_major_layers_take_the_8bit_node(monkeypatch, bias):
    """The DiT's 8-bit layers with bf16 products run the 8-bit GEMM node (no float32 weight): the
    bits of the form it replaced (the weight dequantized, the float bf16 node, then the bias), close
    to the plain QuantizedLinear; twin mode keeps the MLX form, small products stay float32."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    reference = nn.QuantizedLinear.from_linear(randomized(nn.Linear(192, 80, bias=bias), seed=9), group_size=64,
                                               bits=8)
    holder = nn.Module()
    holder.layers = [rebuild(reference)]
    backends.accelerate(holder, "dit", matmul="bf16")
    layer = holder.layers[0]
    assert type(layer) is quantized.Bf16KMajorQuantizedLinear and layer.k_major
    for shape in ((9, 192), (2, 150, 192), (1, 192)):
        x = mx.random.normal(shape, key=mx.random.key(shape[0]))
        out = layer(x)
        assert nodes(out) == {"MobileoBf16MatmulQ8"}
        weight = quantized.dequantize_k_major(layer.weight, layer.scales, layer.biases, 64)
        replaced = primitives.bf16_matmul(x, weight)
        assert same_bits(out, replaced + layer.bias if bias else replaced)
        assert 1e-6 < relative_error(out, reference(x)) < 1e-2
        monkeypatch.setenv(backends.KERNELS_ENV, "twin")
        twin = layer(x)
        assert not nodes(twin) and relative_error(out, twin) < 1e-6
        monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 9 * 192 * 80 + 1)  # small products stay float32
    x = mx.random.normal((9, 192), key=mx.random.key(1))
    assert not nodes(layer(x)) and relative_error(layer(x), reference(x)) < 1e-5


@on_cpu
@needs_bf16
def test_bf16_decoder_forms_stay_close(monkeypatch):
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    x = mx.random.normal((1, 7, 6, 32), key=mx.random.key(16))
    for plain in (dcae.ResBlock(32, 32, "rms_norm", "silu"), dcae.DCUpBlock2d(32, 16, True),
                  nn.Conv2d(32, 8, 3, padding=1)):
        randomized(plain, seed=7, scale=0.2)
        fast = backends.accelerate(rebuild(plain), "vae", matmul="bf16")
        out = fast(x)
        assert nodes(out) & {"MobileoBf16Conv", "MobileoBf16SubpixelConv"}, type(plain)
        assert 1e-6 < relative_error(out, plain(x)) < 2e-2


@on_cpu
@needs_bf16
@pytest.mark.parametrize("shape", [(1, 7, 6, 32), (2, 5, 9, 24), (1, 1, 3, 40)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_decoder_forms_run_each_conv_as_one_node(monkeypatch, shape):
    """With bf16 products the DC-AE's forms run every 3x3 conv as one conv node (the upsampler's
    four parity convs as one sub-pixel node), no window GEMM left: the same rounded products as the window
    GEMMs they replaced (the twin, MOBILEO_MLX_KERNELS=twin), summed in another order; products
    below the bf16 threshold stay float32 (the plain-MLX form, bit for bit)."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    x = mx.random.normal(shape, key=mx.random.key(shape[2]))
    channels = shape[-1]
    for plain in (dcae.ResBlock(channels, channels, "rms_norm", "silu"), dcae.DCUpBlock2d(channels, channels // 2, True),
                  dcae.DCUpBlock2d(channels, channels // 4, True), dcae.DCUpBlock2d(channels, channels, True),
                  dcae.DCUpBlock2d(channels, channels * 2, True), nn.Conv2d(channels, 3, 3, padding=1)):
        randomized(plain, seed=8, scale=0.2)
        fast = backends.accelerate(rebuild(plain), "vae", matmul="bf16")
        out = fast(x)
        upsampler = isinstance(plain, dcae.DCUpBlock2d)
        assert nodes(out) == {"MobileoBf16SubpixelConv" if upsampler else "MobileoBf16Conv"}, type(plain)
        with monkeypatch.context() as patch:
            patch.setenv(backends.KERNELS_ENV, "twin")
            twin = fast(x)
        # a ResBlock's second conv rounds the first one's output to bfloat16 again: a last-bit
        # difference there can move that rounding by a bfloat16 ulp
        chained = isinstance(plain, dcae.ResBlock)
        assert not nodes(twin) and relative_error(out, twin) < (3e-5 if chained else 1e-6)
        assert 1e-6 < relative_error(out, plain(x)) < 2e-2
        with monkeypatch.context() as patch:
            patch.setattr(tuning, "BF16_MIN_PRODUCT", 1 << 40)
            fp32 = fast(x)
            assert not nodes(fp32)
        fp32_form = backends.accelerate(rebuild(plain), "vae")
        assert same_bits(fp32, fp32_form(x))


@on_cpu
@needs_bf16
def test_bf16_upsampler_follows_new_weights(monkeypatch):
    """The sub-pixel node's combined taps are rebuilt when the conv's weight is replaced, for the
    node and for its window-GEMM twin (which copies its taps out of the node's)."""
    monkeypatch.setattr(tuning, "BF16_MIN_PRODUCT", 0)
    x = mx.random.normal((1, 5, 6, 32), key=mx.random.key(21))
    plain = randomized(dcae.DCUpBlock2d(32, 16, True), seed=9, scale=0.2)
    fast = backends.accelerate(rebuild(plain), "vae", matmul="bf16")
    fast(x)
    fast.conv.weight = fast.conv.weight * 2
    plain.conv.weight = fast.conv.weight
    assert 1e-6 < relative_error(fast(x), plain(x)) < 2e-2
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    assert relative_error(fast(x), plain(x)) < 2e-2
