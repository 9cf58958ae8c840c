"""DC-AE decoder: diffusers ``AutoencoderDC`` names -> ``DCAEDecoder`` names (docs/reference-model.md §1.3, §2.6).

The checkpoint stores the whole autoencoder under ``model.vae.`` with diffusers'
names. Only ``model.vae.decoder.*`` is used; the encoder is dropped (IGNORE).
Runtime names are the decoder names without the prefix; conv kernels go from
OIHW to OHWI, the 1x1 convs the runtime runs as ``nn.Linear`` (GLUMBConv's
``conv_inverted`` / ``conv_point``) and the grouped 1x1 ``proj_out`` become [O, I/g].

The architecture comes from the diffusers ``vae/config.json`` (the Sana 600M
512px one of ``convert/defaults.py`` when none is given) and is checked against
every decoder tensor shape.
"""

from __future__ import annotations

import re
from typing import Mapping

from mobileo_mlx.convert.defaults import VAE_CONFIG
from mobileo_mlx.convert.mapping import Rule, conv2d, convert_with_rules, pointwise
from mobileo_mlx.weights import config_problem

PREFIX = "model.vae.decoder."
KEYS = re.compile(r"model\.vae\.")
IGNORE = re.compile(r"model\.vae\.encoder\.")

_P = r"model\.vae\.decoder\."
_LAYER = r"up_blocks\.\d+\.\d+\."
RULES = (
    Rule(_P + r"((?:conv_in|conv_out)\.weight)", r"\1", conv2d),
    Rule(_P + r"((?:conv_in|conv_out)\.bias)", r"\1"),
    Rule(_P + r"(norm_out\.(?:weight|bias))", r"\1"),
    # Upsample conv and ResBlock convs.
    Rule(_P + "(" + _LAYER + r"(?:conv|conv1|conv2)\.weight)", r"\1", conv2d),
    Rule(_P + "(" + _LAYER + r"(?:conv|conv1)\.bias)", r"\1"),
    Rule(_P + "(" + _LAYER + r"norm\.(?:weight|bias))", r"\1"),
    # LiteMLA.
    Rule(_P + "(" + _LAYER + r"attn\.to_(?:q|k|v|out)\.weight)", r"\1"),
    Rule(_P + "(" + _LAYER + r"attn\.to_qkv_multiscale\.\d+\.proj_in\.weight)", r"\1", conv2d),
    Rule(_P + "(" + _LAYER + r"attn\.to_qkv_multiscale\.\d+\.proj_out\.weight)", r"\1", pointwise),
    Rule(_P + "(" + _LAYER + r"attn\.norm_out\.(?:weight|bias))", r"\1"),
    # GLUMBConv.
    Rule(_P + "(" + _LAYER + r"conv_out\.conv_inverted\.weight)", r"\1", pointwise),
    Rule(_P + "(" + _LAYER + r"conv_out\.conv_depth\.weight)", r"\1", conv2d),
    Rule(_P + "(" + _LAYER + r"conv_out\.(?:conv_inverted|conv_depth)\.bias)", r"\1"),
    Rule(_P + "(" + _LAYER + r"conv_out\.conv_point\.weight)", r"\1", pointwise),
    Rule(_P + "(" + _LAYER + r"conv_out\.norm\.(?:weight|bias))", r"\1"),
)

# AutoencoderDC.__init__ defaults for the decoder fields a config may omit.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "decoder_block_types": "ResBlock",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "pixel_shuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}


def _per_stage(value, stages: int) -> list:
    return [value] * stages if isinstance(value, str) else list(value)


def runtime_config(vae_config: Mapping) -> dict:
    """The ``DCAEDecoderConfig`` dict from a diffusers AutoencoderDC config."""
    cfg = {**DIFFUSERS_DEFAULTS, **vae_config}
    channels = [int(c) for c in cfg["decoder_block_out_channels"]]
    stages = len(channels)
    return {
        "latent_channels": int(cfg["latent_channels"]),
        "image_channels": int(cfg["in_channels"]),
        "block_out_channels": channels,
        "block_types": _per_stage(cfg["decoder_block_types"], stages),
        "layers_per_block": [int(n) for n in cfg["decoder_layers_per_block"]],
        "qkv_multiscales": [[int(k) for k in ks] for ks in cfg["decoder_qkv_multiscales"]],
        "norm_types": _per_stage(cfg["decoder_norm_types"], stages),
        "act_fns": _per_stage(cfg["decoder_act_fns"], stages),
        "attention_head_dim": int(cfg["attention_head_dim"]),
        "upsample_block_type": cfg["upsample_block_type"],
        "in_shortcut": bool(cfg["decoder_in_shortcut"]),
        "conv_act_fn": cfg["decoder_conv_act_fn"],
        "scaling_factor": float(cfg["scaling_factor"]),
    }


def expected_shapes(config: Mapping) -> dict[str, tuple]:
    """Every decoder tensor (checkpoint name) and its shape under a runtime ``config``."""
    channels = config["block_out_channels"]
    stages = len(channels)
    latent, image = config["latent_channels"], config["image_channels"]
    head_dim = config["attention_head_dim"]
    shapes = {
        "conv_in.weight": (channels[-1], latent, 3, 3),
        "conv_in.bias": (channels[-1],),
        "norm_out.weight": (channels[0],),
        "norm_out.bias": (channels[0],),
        "conv_out.weight": (image, channels[0], 3, 3),
        "conv_out.bias": (image,),
    }
    for i in range(stages):
        c = channels[i]
        index = 0
        if i < stages - 1:
            conv_out = c if config["upsample_block_type"] == "interpolate" else 4 * c
            shapes[f"up_blocks.{i}.0.conv.weight"] = (conv_out, channels[i + 1], 3, 3)
            shapes[f"up_blocks.{i}.0.conv.bias"] = (conv_out,)
            index = 1
        for layer in range(index, index + config["layers_per_block"][i]):
            name = f"up_blocks.{i}.{layer}."
            if config["block_types"][i] == "ResBlock":
                shapes[name + "conv1.weight"] = (c, c, 3, 3)
                shapes[name + "conv1.bias"] = (c,)
                shapes[name + "conv2.weight"] = (c, c, 3, 3)
                shapes[name + "norm.weight"] = (c,)
                shapes[name + "norm.bias"] = (c,)
                continue
            heads = c // head_dim
            inner = heads * head_dim
            scales = config["qkv_multiscales"][i]
            for proj in ("to_q", "to_k", "to_v"):
                shapes[name + f"attn.{proj}.weight"] = (inner, c)
            for s, kernel in enumerate(scales):
                shapes[name + f"attn.to_qkv_multiscale.{s}.proj_in.weight"] = (3 * inner, 1, kernel, kernel)
                shapes[name + f"attn.to_qkv_multiscale.{s}.proj_out.weight"] = (3 * inner, head_dim, 1, 1)
            shapes[name + "attn.to_out.weight"] = (c, inner * (1 + len(scales)))
            shapes[name + "attn.norm_out.weight"] = (c,)
            shapes[name + "attn.norm_out.bias"] = (c,)
            hidden = 4 * c  # GLUMBConv expand ratio 4
            shapes[name + "conv_out.conv_inverted.weight"] = (2 * hidden, c, 1, 1)
            shapes[name + "conv_out.conv_inverted.bias"] = (2 * hidden,)
            shapes[name + "conv_out.conv_depth.weight"] = (2 * hidden, 1, 3, 3)
            shapes[name + "conv_out.conv_depth.bias"] = (2 * hidden,)
            shapes[name + "conv_out.conv_point.weight"] = (c, hidden, 1, 1)
            shapes[name + "conv_out.norm.weight"] = (c,)
            shapes[name + "conv_out.norm.bias"] = (c,)
    return {PREFIX + name: shape for name, shape in shapes.items()}


def config_from_checkpoint(
    shapes: Mapping[str, tuple], checkpoint_config: Mapping, diffusers_config: Mapping | None = None
) -> dict:
    """The decoder config from the diffusers VAE config (built-in Sana 600M one when
    absent), checked against the checkpoint's decoder tensors."""
    vae_config = (diffusers_config or {}).get("vae") or VAE_CONFIG
    config = runtime_config(vae_config)
    problem = config_problem("vae", config, own_checks=False)
    if problem:  # before the shapes are derived from it (a head size of 0 divides by zero)
        raise ValueError(f"{problem.removeprefix('vae.')} (in the VAE config)")
    unknown = set(config["block_types"]) - {"ResBlock", "EfficientViTBlock"}
    if unknown:
        raise ValueError(f"unsupported DC-AE decoder block types {sorted(unknown)}")

    expected = expected_shapes(config)
    found = {name: tuple(shape) for name, shape in shapes.items() if name.startswith(PREFIX)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "DC-AE decoder tensors do not match the VAE config: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise ValueError(f"DC-AE decoder tensor {name} has shape {found[name]}, the VAE config implies {shape}")
    return config


def convert(names, get, config):
    return convert_with_rules(RULES, names, get)
