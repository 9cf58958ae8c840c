"""SANA DiT: parity with diffusers' SanaTransformer2DModel, the hoisted
conditioning path, the DiT mapping's config checks, and a full-size shape run."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel
from tests.helpers import SEAMS, convert_state_dict, relative_error, seamed
from mlx.utils import tree_flatten

from mobileo_mlx import backends
from mobileo_mlx.convert.mapping import load_component, map_name
from mobileo_mlx.kernels import primitives
from mobileo_mlx.models.sana import SanaConfig, SanaTransformer

KEYS_FULL = Path(__file__).resolve().parent / "data" / "keys_full.txt"  # the released checkpoint's key list
TOLERANCE = 1e-4  # fp32, identical weights; reached 4e-6 (Mobile-O layout), 3e-5 (variant)

# The Mobile-O layout (patch 1, no affine norms, no self-attention bias) at toy size ...
SMALL = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=24,
    mlp_ratio=2.5,
    sample_size=8,
    patch_size=1,
    interpolation_scale=None,
    norm_elementwise_affine=False,
    attention_bias=False,
)
# ... and the options Mobile-O does not use but the runtime supports.
VARIANT = dict(SMALL, patch_size=2, out_channels=4, norm_elementwise_affine=True, attention_bias=True)

TIMESTEPS = [999, 136]  # integer scheduler timesteps, one per CFG half


def randomized_reference(config: dict, seed: int) -> SanaTransformer2DModel:
    """diffusers model with every parameter redrawn (tables, norms and biases included)."""
    model = SanaTransformer2DModel(**config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # ~1/sqrt(fan_in) for matrices keeps activations O(1) through the blocks.
            std = param[0].numel() ** -0.5 if param.ndim >= 2 and "scale_shift_table" not in name else 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module", params=[(layout, seam) for layout in ("mobileo", "variant") for seam in SEAMS],
                ids=lambda param: "-".join(param))
def models(request):
    layout, seam = request.param
    config = SMALL if layout == "mobileo" else VARIANT
    reference = randomized_reference(config, seed=0)
    state_dict = {"model.dit." + k: v for k, v in reference.state_dict().items()}
    runtime_config, weights = convert_state_dict("dit", state_dict, {}, {"transformer": dict(reference.config)})
    model = SanaTransformer(SanaConfig.from_dict(runtime_config))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return reference, seamed(model, "dit", seam)


def make_inputs(height, width, caption_length, with_mask, in_channels=8, seed=1):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, height, width, in_channels)).astype(np.float32)
    caption = rng.standard_normal((2, caption_length, 24)).astype(np.float32)
    mask = None
    if with_mask:  # first sample keeps a prefix of the caption, second all but the last token
        mask = np.zeros((2, caption_length), dtype=np.float32)
        mask[0, : max(1, caption_length // 2)] = 1
        mask[1, :-1] = 1
    return latents, caption, mask


def reference_velocity(reference, latents, caption, mask, timesteps=TIMESTEPS) -> np.ndarray:
    with torch.no_grad():
        out = reference(
            hidden_states=torch.from_numpy(latents).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(caption),
            timestep=torch.tensor(timesteps, dtype=torch.int64),
            encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
        ).sample
    return out.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC


def mlx_velocity(model, latents, caption, mask, timesteps=TIMESTEPS) -> mx.array:
    out = model(
        mx.array(latents),
        mx.array(timesteps, dtype=mx.int32),
        mx.array(caption),
        None if mask is None else mx.array(mask),
    )
    mx.eval(out)
    return out


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("caption_length", [5, 77])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["8x8", "6x10"])
def test_velocity_matches_diffusers(models, size, caption_length, with_mask):
    reference, model = models
    latents, caption, mask = make_inputs(*size, caption_length, with_mask)
    expected = reference_velocity(reference, latents, caption, mask)
    actual = mlx_velocity(model, latents, caption, mask)
    assert actual.shape == expected.shape == (2, *size, model.config.out_channels)
    assert relative_error(actual, expected) <= TOLERANCE
    if with_mask:  # the mask must matter, or this case proves nothing about it
        unmasked = mlx_velocity(model, latents, caption, None)
        assert relative_error(unmasked, expected) > 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_odd_batches_match_diffusers(models, batch):
    # An odd batch cannot split into two equal image halves: on the CPU the Mix-FFN's
    # middle splits its channels over the two streams instead (a different code path).
    reference, model = models
    latents, caption, _ = make_inputs(6, 10, 5, with_mask=False)
    latents, caption = np.concatenate([latents] * 2)[:batch], np.concatenate([caption] * 2)[:batch]
    timesteps = (TIMESTEPS * 2)[:batch]
    expected = reference_velocity(reference, latents, caption, None, timesteps)
    actual = mlx_velocity(model, latents, caption, None, timesteps)
    assert actual.shape == expected.shape == (batch, 6, 10, model.config.out_channels)
    assert relative_error(actual, expected) <= TOLERANCE


def test_float_and_integer_timesteps_agree(models):
    _, model = models
    latents, caption, _ = make_inputs(8, 8, 5, False)
    as_int = mlx_velocity(model, latents, caption, None)
    as_float = model(mx.array(latents), mx.array([999.0, 136.0]), mx.array(caption))
    assert np.array_equal(np.array(as_int), np.array(as_float))


def test_hoisted_conditioning_equals_plain_call(models):
    _, model = models
    latents, caption, mask = make_inputs(6, 10, 77, True)
    text = model.encode_text(mx.array(caption), mx.array(mask))
    for timesteps in ([999, 999], [562, 562], [136, 0]):  # one text encoding reused across steps
        time = model.embed_timestep(mx.array(timesteps))
        hoisted = model(mx.array(latents), time=time, text=text)
        plain = mlx_velocity(model, latents, caption, mask, timesteps)
        assert np.array_equal(np.array(hoisted), np.array(plain))

    # A scalar timestep is shared by the whole batch (the CFG pair).
    shared = model(mx.array(latents), time=model.embed_timestep(562), text=text)
    plain = mlx_velocity(model, latents, caption, mask, [562, 562])
    assert relative_error(shared, plain) <= 1e-6


def test_call_requires_one_form_of_each_condition(models):
    _, model = models
    latents, caption, _ = make_inputs(8, 8, 5, False)
    text = model.encode_text(mx.array(caption))
    with pytest.raises(ValueError, match="timestep"):
        model(mx.array(latents), mx.array(TIMESTEPS), time=model.embed_timestep(1), text=text)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(mx.array(latents), mx.array(TIMESTEPS))


def test_float16_stays_finite_and_close(models):
    reference, model = models
    half = SanaTransformer(model.config)
    half.load_weights(tree_flatten(model.parameters()), strict=True)
    half.set_dtype(mx.float16)
    if type(model.transformer_blocks[0].ff) is not type(half.transformer_blocks[0].ff):
        backends.accelerate(half, "dit")
    latents, caption, mask = make_inputs(6, 10, 77, True)
    out = half(
        mx.array(latents, dtype=mx.float16),
        mx.array(TIMESTEPS),
        mx.array(caption, dtype=mx.float16),
        mx.array(mask),
    )
    assert out.dtype == mx.float16
    out = np.array(out.astype(mx.float32))
    assert np.isfinite(out).all()
    assert relative_error(out, reference_velocity(reference, latents, caption, mask)) <= 1e-2  # reached 1e-3 to 5e-3


# --- the mapping's config checks -------------------------------------------------


def small_checkpoint_shapes() -> dict:
    reference = SanaTransformer2DModel(**SMALL)
    return {"model.dit." + k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize(
    "override, field",
    [
        ({"num_layers": 3}, "num_layers"),
        ({"mlp_ratio": 3.0}, "mlp_ratio"),
        ({"caption_channels": 32}, "caption_channels"),
        ({"num_cross_attention_heads": 4}, "num_cross_attention_heads"),
        ({"attention_bias": True}, "attention_bias"),
        ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
        ({"out_channels": 4}, "out_channels"),
    ],
)
def test_config_mismatch_names_the_field(override, field):
    mapping = load_component("dit")
    with pytest.raises(ValueError, match=field):
        mapping.config_from_checkpoint(small_checkpoint_shapes(), {}, {"transformer": dict(SMALL, **override)})


def test_unsupported_options_are_rejected():
    mapping = load_component("dit")
    shapes = small_checkpoint_shapes()
    for override in ({"interpolation_scale": 1.0}, {"qk_norm": "rms_norm_across_heads"}, {"guidance_embeds": True}):
        with pytest.raises(ValueError, match=next(iter(override))):
            mapping.config_from_checkpoint(shapes, {}, {"transformer": dict(SMALL, **override)})


def test_missing_diffusers_config_falls_back_to_sana_600m():
    mapping = load_component("dit")
    # The built-in 600M config cannot describe a 2-layer checkpoint.
    with pytest.raises(ValueError, match="num_layers=28"):
        mapping.config_from_checkpoint(small_checkpoint_shapes(), {}, None)


# --- full size ---------------------------------------------------------------------


def released_dit_shapes() -> dict:
    assert KEYS_FULL.exists(), f"{KEYS_FULL} is missing"
    shapes = {}
    for line in KEYS_FULL.read_text().splitlines():
        if line.startswith("model.dit."):  # "name<TAB>[d0, d1, ...]<TAB>dtype"; '#' lines are comments
            name, shape, _dtype = line.split("\t")
            shapes[name] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


def fill_random_(model, seed: int = 0) -> None:
    """Cheap random weights: a 64k-value normal draw tiled over each tensor, scaled like
    1/sqrt(fan_in) (drawing 592M values one by one costs more than the forward pass)."""
    key = mx.random.key(seed)
    updates = []
    for name, param in tree_flatten(model.parameters()):
        key, subkey = mx.random.split(key)
        draw = mx.random.normal((min(param.size, 1 << 16),), key=subkey)
        values = mx.tile(draw, -(-param.size // draw.size))[: param.size].reshape(param.shape)
        std = 0.5 if param.ndim == 1 or "scale_shift_table" in name else (param.size // param.shape[0]) ** -0.5
        updates.append((name, values * std))
    model.load_weights(updates, strict=True)


@pytest.fixture(scope="module")
def full_model():
    model = SanaTransformer(SanaConfig())  # SANA-600M defaults
    fill_random_(model)
    return model


def test_released_checkpoint_maps_onto_full_model(full_model):
    mapping = load_component("dit")
    shapes = released_dit_shapes()
    config = mapping.config_from_checkpoint(shapes, {}, None)
    assert config == asdict(SanaConfig())
    assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (28, 1152)

    parameters = {name: tuple(p.shape) for name, p in tree_flatten(full_model.parameters())}
    mapped = {}
    for name, shape in shapes.items():
        target, transform = map_name(mapping.RULES, name)
        mapped[target] = transform(np.empty(shape, dtype=np.float32)).shape
    assert mapped == parameters  # every tensor lands on a parameter of the same shape, and vice versa
    assert len(shapes) == 548
    assert sum(int(np.prod(s)) for s in parameters.values()) == 591_747_872  # docs/reference-model.md §2.5


@pytest.mark.slow
def test_full_size_forward_shape(full_model):
    rng = np.random.default_rng(0)
    latents = mx.array(rng.standard_normal((2, 16, 16, 32)).astype(np.float32))
    caption = mx.array(rng.standard_normal((2, 40, 2304)).astype(np.float32))
    out = full_model(latents, mx.array([999, 999]), caption)
    mx.eval(out)
    assert out.shape == (2, 16, 16, 32)
    assert out.dtype == mx.float32
    assert np.isfinite(np.array(out)).all()


@pytest.fixture(scope="module")
def mobileo_layout():
    """The Mobile-O layout alone: the variant's toy ReLU attention (head dim 8) is ill-conditioned
    to any bf16 rounding of its queries (PyTorch with bf16-rounded q_proj inputs: 6.6 % off)."""
    reference = randomized_reference(SMALL, seed=0)
    state_dict = {"model.dit." + k: v for k, v in reference.state_dict().items()}
    runtime_config, weights = convert_state_dict("dit", state_dict, {}, {"transformer": dict(reference.config)})
    model = SanaTransformer(SanaConfig.from_dict(runtime_config))
    model.load_weights(list(weights.items()), strict=True)
    return reference, model


@pytest.mark.skipif(backends.bf16_unavailable_reason() is not None,
                    reason=f"bf16 CPU matmuls unavailable here: {backends.bf16_unavailable_reason()}")
def test_bf16_cpu_matmuls_stay_close(mobileo_layout, monkeypatch):
    """With bf16 CPU matmuls (the default where the CPU has AVX512-BF16) the Linear layers take
    bfloat16 inputs: close to diffusers' float32, as half precision on a GPU."""
    reference, model = mobileo_layout
    if backends.platform.backend() != "cpu" or backends.kernels_mode() == "reference":
        pytest.skip("bf16 products are the CPU backend's forms'")
    backends.accelerate(model, "dit", matmul="bf16")
    latents, caption, mask = make_inputs(6, 10, 77, True)
    expected = reference_velocity(reference, latents, caption, mask)
    monkeypatch.setattr(backends.tuning, "BF16_MIN_PRODUCT", 0)  # the toy model's products are all small
    done = primitives.extension().bf16_products_done()
    actual = mlx_velocity(model, latents, caption, mask)
    assert primitives.extension().bf16_products_done() > done or backends.kernels_mode() == "twin"
    assert 1e-5 < relative_error(actual, expected) <= 1e-2  # reached 6e-3; the fp16 model: 1e-3 to 5e-3
