"""FastViTHD: parity against the compact PyTorch reference through the real
weight mapping (BatchNorm folding included), config inference from tensor
shapes, and the full-size checkpoint's names and shapes."""

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mobileo_mlx.convert.mapping import fastvit as mapping
from mobileo_mlx.models.fastvit import FastViTConfig, FastViTHD
from tests.helpers import SEAMS, convert_state_dict, relative_error, seamed
from tests.reference.fastvit_torch import FastViTHDReference, ReferenceConfig, randomize_

PREFIX = mapping.PREFIX
_ROOT = Path(__file__).resolve().parents[1]
# The released checkpoint's key list (a copy in tests/data).
KEYS_FULL = _ROOT / "tests" / "data" / "keys_full.txt"

# docs/reference-model.md §2.1 layout at small widths; attention needs multiples of head_dim 32.
SMALL = ReferenceConfig(
    widths=[8, 16, 32, 64, 128], depths=[1, 2, 1, 2, 1], clip_dim=12,
)
# Another layout: attention from stage 2 on, a single RepCPE before stage 2.
VARIANT = ReferenceConfig(
    widths=[8, 16, 32, 96, 192],
    depths=[1, 1, 2, 1, 1],
    mixers=["repmixer", "repmixer", "attention", "attention", "attention"],
    pos_embeds=[False, False, True, False, False],
    clip_dim=12,
)


def full_checkpoint_shapes() -> dict[str, tuple]:
    """{name: shape} of the released checkpoint's vision tower (keys_full.txt)."""
    assert KEYS_FULL.exists(), f"{KEYS_FULL} is missing"
    shapes = {}
    for line in KEYS_FULL.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape, _dtype = line.split("\t")
        if name.startswith(PREFIX):
            shapes[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def build_reference(config: ReferenceConfig, seed: int = 0) -> FastViTHDReference:
    torch.manual_seed(seed)
    model = FastViTHDReference(config)
    return randomize_(model, torch.Generator().manual_seed(seed + 1)).eval()


def prefixed(state_dict) -> dict:
    return {PREFIX + name: tensor for name, tensor in state_dict.items()}


def converted_model(reference: FastViTHDReference, tower: str, seam: str = "accelerated") -> tuple[dict, FastViTHD]:
    config, weights = convert_state_dict(
        "vision", prefixed(reference.state_dict()), {"mm_vision_tower": tower}
    )
    model = FastViTHD(FastViTConfig.from_dict(config))
    model.load_weights(list(weights.items()), strict=True)
    return config, seamed(model, "vision", seam)


def run_both(reference, model, size: int, dtype=mx.float32) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    actual = model(mx.array(pixels).astype(dtype))
    return np.array(actual.astype(mx.float32)), expected


def test_reference_state_dict_matches_checkpoint_names_and_shapes():
    with torch.device("meta"):
        reference = FastViTHDReference(ReferenceConfig())
    reference_shapes = {PREFIX + k: tuple(v.shape) for k, v in reference.state_dict().items()}
    checkpoint_shapes = full_checkpoint_shapes()
    assert len(checkpoint_shapes) == 629  # docs/reference-model.md §1.3
    assert reference_shapes == checkpoint_shapes


def test_config_from_full_checkpoint():
    config = mapping.config_from_checkpoint(
        full_checkpoint_shapes(), {"mm_vision_tower": "mobileclip_l_1024"}
    )
    assert config == {
        "image_size": 1024,
        "widths": [96, 192, 384, 768, 1536],
        "depths": [2, 12, 24, 4, 2],
        "mixers": ["repmixer", "repmixer", "repmixer", "attention", "attention"],
        "pos_embeds": [False, False, False, True, True],
        "mlp_ratios": [4, 4, 4, 4, 4],
        "head_dim": 32,
        "stem_kernel_size": 3,
        "mixer_kernel_size": 3,
        "ffn_kernel_size": 7,
        "downsample_kernel_size": 7,
        "pos_embed_kernel_size": 7,
        "expansion_kernel_size": 3,
        "mm_hidden_size": 3072,
        "se_width": 192,
        "norm_eps": 1e-5,
    }


def test_config_from_variant_layout():
    reference = build_reference(VARIANT)
    shapes = {k: tuple(v.shape) for k, v in prefixed(reference.state_dict()).items()}
    config = mapping.config_from_checkpoint(shapes, {"mm_vision_tower": "mobileclip_l_192"})
    assert config["image_size"] == 192
    assert config["widths"] == [8, 16, 32, 96, 192]
    assert config["depths"] == [1, 1, 2, 1, 1]
    assert config["mixers"] == ["repmixer", "repmixer", "attention", "attention", "attention"]
    assert config["pos_embeds"] == [False, False, True, False, False]
    assert (config["mm_hidden_size"], config["se_width"]) == (384, 24)


def test_config_rejects_a_missing_downsampler():
    shapes = {
        name: shape
        for name, shape in full_checkpoint_shapes().items()
        if not name.startswith(PREFIX + "network.3.")
    }
    with pytest.raises(ValueError):
        mapping.config_from_checkpoint(shapes, {})


@pytest.mark.parametrize("seam", SEAMS)
def test_gelu_matches_erf_gelu(seam):
    gelu = seamed(FastViTHD(FastViTConfig()), "vision", seam).act  # the exact GELU, not the tanh form
    x = np.linspace(-10, 10, 200_001)
    exact = x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    approx = np.array(gelu(mx.array(x.astype(np.float32))), dtype=np.float64)
    # reached 8.2e-7 (fp32 input rounding included); the tanh form is ~5e-4 off.
    assert np.abs(approx - exact).max() < 2e-6
    if type(gelu) is not nn.GELU:  # the CPU form computes in float32 (MLX's fp16 x * (1 + erf) overflows at 6e4)
        extremes = gelu(mx.array([-6e4, -30.0, 30.0, 6e4], dtype=mx.float16))
        assert np.array(extremes.astype(mx.float32)).tolist() == [0.0, 0.0, 30.0, 6e4]


def test_batchnorm_folding_matches_conv_then_batchnorm():
    reference = build_reference(SMALL)
    conv_bn = reference.network[0][0].convffn.conv
    parts = conv_bn.state_dict()
    weight, bias = mapping.fold_batchnorm(
        *(parts[p].numpy() for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"))
    )
    x = torch.randn(1, 8, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = conv_bn(x).numpy()
    actual = torch.nn.functional.conv2d(
        x, torch.from_numpy(weight), torch.from_numpy(bias), padding=3, groups=8
    ).numpy()
    assert relative_error(actual, expected) < 1e-6  # reached 2.0e-7


@pytest.mark.parametrize("seam", SEAMS)
@pytest.mark.parametrize(
    "reference_config, size",
    [(SMALL, 128), (SMALL, 192), (VARIANT, 192)],
    ids=["small-128", "small-192", "variant-192"],
)
def test_parity_with_reference(reference_config, size, seam):
    reference = build_reference(reference_config)
    _, model = converted_model(reference, f"mobileclip_l_{size}", seam)
    actual, expected = run_both(reference, model, size)
    tokens = (size // 64) ** 2
    assert actual.shape == expected.shape == (2, tokens, reference_config.widths[-1] * 2)
    assert relative_error(actual, expected) <= 1e-4  # reached 6.9e-7 / 7.5e-7 / 8.3e-7 (fp32)


def test_float16_stays_finite_and_close():
    reference = build_reference(SMALL)
    _, model = converted_model(reference, "mobileclip_l_128")
    model.set_dtype(mx.float16)
    actual, expected = run_both(reference, model, 128, dtype=mx.float16)
    assert np.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-2  # reached 9.4e-4


def test_full_size_checkpoint_converts_onto_the_model_and_runs():
    shapes = full_checkpoint_shapes()
    config = mapping.config_from_checkpoint(shapes, {"mm_vision_tower": "mobileclip_l_1024"})
    model = FastViTHD(FastViTConfig.from_dict(config))
    expected_shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}

    owned = [n for n in shapes if mapping.KEYS.match(n) and not mapping.IGNORE.match(n)]
    # Zero-stride stand-ins: conversion only needs the shapes to map and transpose.
    fake = lambda name: np.broadcast_to(np.float32(0.5), shapes[name])  # noqa: E731
    converted_shapes = {name: value.shape for name, value in mapping.convert(owned, fake, config)}
    assert converted_shapes == expected_shapes

    features = model(mx.random.uniform(shape=(1, 256, 256, 3)))
    assert features.shape == (1, 16, 3072)
    assert np.isfinite(np.array(features)).all()
