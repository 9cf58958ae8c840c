"""DC-AE decoder: parity with diffusers ``AutoencoderDC`` (small random configs, fp32; the plain
decoder and the backend's forms), the mapping against the released checkpoint's names, the
decode strategies (exact row bands, blended tiles), fp16, bf16 products."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC
from mlx.utils import tree_flatten

from mobileo_mlx import backends, decoding
from mobileo_mlx.convert.mapping import dcae as dcae_mapping
from mobileo_mlx.convert.mapping import map_name
from mobileo_mlx.decoding import decode_in_row_bands, decode_tiled
from mobileo_mlx.kernels import primitives
from mobileo_mlx.models import build
from mobileo_mlx.models.common import relu_linear_attention
from mobileo_mlx.models.dcae import relu_quadratic_attention
from tests.helpers import SEAMS, convert_state_dict, relative_error, seamed, to_numpy

REFERENCE = Path(__file__).resolve().parent / "data"  # copies of the released checkpoint's key list and configs

# Every decoder structure of the Sana DC-AE, shrunk: 3 ResBlock stages + 3
# EfficientViT stages with a 5x5 multiscale branch, interpolate upsampling,
# in_shortcut, rms_norm, silu. Channel ratios exercise repeat factors 2 and 4.
SMALL_VAE = {
    "in_channels": 3,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16, 16],
    "encoder_layers_per_block": [1, 1, 1],
    "encoder_qkv_multiscales": [[], [], [5]],
    "downsample_block_type": "Conv",
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "decoder_layers_per_block": [1, 2, 1, 2, 1, 2],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "upsample_block_type": "interpolate",
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 0.41407,
}


def _reference(vae_config: dict, seed: int = 0) -> AutoencoderDC:
    """A diffusers AutoencoderDC with every parameter randomized (norm weights and biases too)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in vae_config.items() if k != "_class_name"}
    kwargs["encoder_qkv_multiscales"] = tuple(tuple(s) for s in kwargs["encoder_qkv_multiscales"])
    kwargs["decoder_qkv_multiscales"] = tuple(tuple(s) for s in kwargs["decoder_qkv_multiscales"])
    model = AutoencoderDC(**kwargs).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def _convert(reference: AutoencoderDC, vae_config: dict, seam: str = "accelerated"):
    state_dict = {f"model.vae.{k}": v for k, v in reference.state_dict().items()}
    config, weights = convert_state_dict("vae", state_dict, {}, {"vae": vae_config})
    model = build("vae", config)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return config, seamed(model, "vae", seam)


def _latents(batch: int, height: int, width: int, channels: int, seed: int = 1) -> torch.Tensor:
    """Latents as the pipeline hands them to the decoder: sampled, then divided by the scaling factor."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator) / SMALL_VAE["scaling_factor"]


def _decode_both(reference, model, latents: torch.Tensor):
    with torch.no_grad():
        expected = reference.decode(latents).sample.permute(0, 2, 3, 1)
    actual = model(mx.array(to_numpy(latents.permute(0, 2, 3, 1))))
    return np.array(actual), to_numpy(expected)


@pytest.fixture(scope="module", params=SEAMS)
def small(request):
    reference = _reference(SMALL_VAE)
    config, model = _convert(reference, SMALL_VAE, request.param)
    return reference, config, model


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (2, 2)])
def test_decoder_matches_diffusers(small, size):
    # 4x4 and 3x5 take the linear attention form everywhere (H*W > head_dim 8);
    # 2x2 takes the quadratic form at the latent-resolution stage.
    reference, _, model = small
    actual, expected = _decode_both(reference, model, _latents(2, *size, SMALL_VAE["latent_channels"]))
    assert actual.shape == (2, 32 * size[0], 32 * size[1], 3)
    error = relative_error(actual, expected)
    assert error <= 1e-4, error  # reached ~1e-7


def test_single_image_matches_diffusers(small):
    # One image (what the pipeline decodes): on the CPU the GLUMBConv middle then splits its
    # channels over the two streams instead of the batch.
    reference, _, model = small
    actual, expected = _decode_both(reference, model, _latents(1, 3, 4, SMALL_VAE["latent_channels"]))
    assert actual.shape == (1, 96, 128, 3)
    error = relative_error(actual, expected)
    assert error <= 1e-4, error


@pytest.mark.parametrize("band_pixels", [1, 40, 300])
def test_row_bands_match_diffusers(small, band_pixels, monkeypatch):
    """Decoding in row bands (the decoder's memory bound) is exact: with tiny bands (one row,
    odd cuts, bands smaller than the halo) the decode still matches diffusers, and equals the
    unbanded decode to float32 summation order (BLAS may block a GEMM of fewer rows otherwise)."""
    reference, _, model = small
    latents = _latents(2, 3, 5, SMALL_VAE["latent_channels"])
    whole, expected = _decode_both(reference, model, latents)
    monkeypatch.setattr(backends.tuning, "BAND_PIXELS", band_pixels)
    calls = []
    real = decoding.in_row_bands

    def counting(fn, x, *args, **kwargs):
        calls.append(x.shape[1])
        return real(fn, x, *args, **kwargs)

    monkeypatch.setattr(decoding, "in_row_bands", counting)
    banded = np.array(decode_in_row_bands(model, mx.array(to_numpy(latents.permute(0, 2, 3, 1)))))
    assert len(calls) == 1 + sum(1 for stage in model.up_blocks for layer in stage if hasattr(layer, "row_halo"))
    assert relative_error(banded, expected) <= 1e-5
    np.testing.assert_allclose(banded, whole, rtol=0, atol=1e-6)


def test_pixel_shuffle_upsampling_and_per_stage_activations():
    vae = {
        **SMALL_VAE,
        "upsample_block_type": "pixel_shuffle",
        "decoder_act_fns": ["silu", "relu", "gelu", "silu", "silu", "silu"],
    }
    reference = _reference(vae, seed=3)
    _, model = _convert(reference, vae)
    actual, expected = _decode_both(reference, model, _latents(2, 3, 5, vae["latent_channels"], seed=4))
    error = relative_error(actual, expected)
    assert error <= 1e-4, error


def test_quadratic_and_linear_attention_forms_agree():
    keys = mx.random.split(mx.random.key(0), 3)
    q, k, v = (mx.random.normal((2, 3, 6, 8), key=key) for key in keys)
    linear = np.array(relu_linear_attention(q, k, v, 1e-15))
    # Direct definition: out_i = sum_j relu(q_i).relu(k_j) v_j / (sum_j relu(q_i).relu(k_j) + eps)
    qn = np.maximum(np.array(q, np.float64), 0)
    kn = np.maximum(np.array(k, np.float64), 0)
    vn = np.array(v, np.float64)
    scores = qn @ np.swapaxes(kn, -1, -2)
    expected = scores @ vn / (scores.sum(-1, keepdims=True) + 1e-15)
    assert relative_error(np.array(relu_quadratic_attention(q, k, v)), expected) <= 1e-6
    assert relative_error(linear, expected) <= 1e-6


def test_float16_stays_finite_and_close(small):
    _, _, model = small
    latents = mx.array(to_numpy(_latents(1, 4, 4, SMALL_VAE["latent_channels"]).permute(0, 2, 3, 1)))
    expected = np.array(model(latents))
    model.set_dtype(mx.float16)
    try:
        half = model(latents.astype(mx.float16))
        assert half.dtype == mx.float16
        half = np.array(half.astype(mx.float32))
    finally:
        model.set_dtype(mx.float32)
    assert np.isfinite(half).all()
    error = relative_error(half, expected)
    assert error <= 2e-2, error


# ---------------------------------------------------------------- tiling


def test_tiled_blending_is_seamless_for_a_local_decoder():
    """With a decoder whose output at a pixel depends only on the latent below it,
    tiles agree wherever they overlap, so the blend must reproduce it exactly:
    this checks tile placement and that the ramp weights sum to one."""

    def local_decode(z):
        b, h, w, _ = z.shape
        pixels = mx.tanh(z[..., :3] * 2.0 + z[..., 3:6])
        pixels = mx.broadcast_to(pixels[:, :, None, :, None, :], (b, h, 32, w, 32, 3))
        return pixels.reshape(b, 32 * h, 32 * w, 3)

    latents = mx.random.normal((2, 7, 11, 8), key=mx.random.key(5))
    expected = np.array(local_decode(latents))
    for tile, overlap in [(4, 2), (5, 1), (3, 2), (6, 3), (4, 0)]:
        tiled = np.array(decode_tiled(local_decode, latents, tile=tile, overlap=overlap))
        np.testing.assert_allclose(tiled, expected, rtol=0, atol=1e-6, err_msg=f"tile {tile} overlap {overlap}")


def test_tiled_with_one_tile_is_the_plain_decode(small):
    _, _, model = small
    latents = mx.array(to_numpy(_latents(2, 3, 5, SMALL_VAE["latent_channels"]).permute(0, 2, 3, 1)))
    assert np.array_equal(np.array(decode_tiled(model, latents, tile=5, overlap=2)), np.array(model(latents)))


def test_tiled_is_close_to_untiled():
    """Tiles see less context than the whole latent (convs are zero-padded at tile edges,
    attention is global within a tile), so tiled decoding only approximates the plain
    decode. With fully random weights the decoder has no locality to speak of (relative
    difference ~0.5-0.7, a property of tiling, not of the blend); so the residual branches
    are damped here, leaving a mostly local decoder, as a trained one is."""
    reference = _reference(SMALL_VAE)
    with torch.no_grad():
        for name, param in reference.decoder.named_parameters():
            if name.startswith("up_blocks") and "norm" in name:  # block output norms
                param.mul_(0.02)
    _, model = _convert(reference, SMALL_VAE)
    latents = mx.array(to_numpy(_latents(1, 10, 10, SMALL_VAE["latent_channels"], seed=7).permute(0, 2, 3, 1)))
    whole = np.array(model(latents))
    tiled = np.array(decode_tiled(model, latents, tile=8, overlap=6))  # 2 x 2 tiles
    assert tiled.shape == whole.shape
    error = relative_error(tiled, whole)
    mean_error = float(np.abs(tiled - whole).mean())
    assert error <= 0.1 and mean_error <= 0.01, (error, mean_error)


# ---------------------------------------------------------------- released checkpoint names


def _released_decoder_shapes() -> dict[str, tuple]:
    shapes = {}
    for line in (REFERENCE / "keys_full.txt").read_text().splitlines():
        if line.startswith("#") or not line.startswith("model.vae."):
            continue
        name, shape, _ = line.split("\t")
        shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def released():
    shapes = _released_decoder_shapes()
    owned = {k: v for k, v in shapes.items() if dcae_mapping.KEYS.match(k) and not dcae_mapping.IGNORE.match(k)}
    return shapes, owned


def test_released_names_map_onto_the_full_size_decoder(released):
    shapes, owned = released
    assert all(name.startswith("model.vae.decoder.") for name in owned)
    assert len(owned) == 196 and len(shapes) - len(owned) > 0  # the encoder is dropped
    config = dcae_mapping.config_from_checkpoint(owned, {}, None)
    model = build("vae", config)
    params = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    assert sum(int(np.prod(s)) for s in params.values()) == 159_223_171  # docs/reference-model.md §2.6
    converted = {}
    for name, shape in owned.items():
        target, transform = map_name(dcae_mapping.RULES, name)
        converted[target] = transform(np.zeros(shape, np.float32)).shape
    assert converted == params


def test_shape_mismatch_is_reported(released):
    _, owned = released
    bad = dict(owned)
    name = "model.vae.decoder.up_blocks.4.2.attn.to_out.weight"
    bad[name] = (1024, 1024)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        dcae_mapping.config_from_checkpoint(bad, {}, None)
    missing = dict(owned)
    del missing["model.vae.decoder.norm_out.bias"]
    with pytest.raises(ValueError, match="missing"):
        dcae_mapping.config_from_checkpoint(missing, {}, None)


def test_full_size_decoder_output_shape(released):
    _, owned = released
    model = build("vae", dcae_mapping.config_from_checkpoint(owned, {}, None))
    latents = mx.random.normal((1, 2, 2, 32), key=mx.random.key(0))
    image = model(latents)
    mx.eval(image)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(np.array(image)).all()


@pytest.mark.skipif(backends.bf16_unavailable_reason() is not None,
                    reason=f"bf16 CPU matmuls unavailable here: {backends.bf16_unavailable_reason()}")
def test_bf16_cpu_matmuls_stay_close(monkeypatch):
    """The decoder with bf16 CPU matmuls (its 1x1 and 3x3 convs): close to diffusers' float32."""
    reference = _reference(SMALL_VAE)
    _, model = _convert(reference, SMALL_VAE, "plain")
    if backends.platform.backend() != "cpu" or backends.kernels_mode() == "reference":
        pytest.skip("bf16 products are the CPU backend's forms'")
    backends.accelerate(model, "vae", matmul="bf16")
    monkeypatch.setattr(backends.tuning, "BF16_MIN_PRODUCT", 0)
    done = primitives.extension().bf16_products_done()
    actual, expected = _decode_both(reference, model, _latents(1, 4, 4, SMALL_VAE["latent_channels"]))
    assert primitives.extension().bf16_products_done() > done or backends.kernels_mode() == "twin"
    assert 1e-5 < relative_error(actual, expected) <= 3e-2  # reached 1.7e-2 (bf16 keeps 8 bits, fp16 11)
