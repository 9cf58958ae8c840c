"""Mobile Conditioning Projector: ``model.diffusion_connector.fusion.*`` (26 tensors, docs/reference-model.md §2.4).

Original layout: ``layer_weights`` [L], ``temperature`` [] (a buffer),
``input_compress.{0: Linear, 1: LayerNorm}``,
``sequence_refiners.<i>.{conv.depthwise [C,1,k], conv.pointwise [C,C,1], conv.norm,
channel_attn.fc.{0,2} (Linear, no bias), norm}``, ``output_proj.{0: Linear, 1: LayerNorm}``.
"""

from __future__ import annotations

import re

from mobileo_mlx.convert.mapping import Rule, conv1d, convert_with_rules, pointwise

PREFIX = "model.diffusion_connector.fusion."
_P = re.escape(PREFIX)

KEYS = re.compile(_P)
IGNORE = None

_REFINER = _P + r"sequence_refiners\.(\d+)\."

RULES = (
    Rule(_P + r"layer_weights", "layer_weights"),
    Rule(_P + r"temperature", "temperature"),
    Rule(_P + r"input_compress\.0\.(weight|bias)", r"compress.\1"),
    Rule(_P + r"input_compress\.1\.(weight|bias)", r"compress_norm.\1"),
    Rule(_REFINER + r"conv\.depthwise\.weight", r"refiners.\1.depthwise.weight", conv1d),
    Rule(_REFINER + r"conv\.pointwise\.weight", r"refiners.\1.pointwise.weight", pointwise),
    Rule(_REFINER + r"conv\.norm\.(weight|bias)", r"refiners.\1.conv_norm.\2"),
    Rule(_REFINER + r"channel_attn\.fc\.0\.weight", r"refiners.\1.channel_attention.reduce.weight"),
    Rule(_REFINER + r"channel_attn\.fc\.2\.weight", r"refiners.\1.channel_attention.expand.weight"),
    Rule(_REFINER + r"norm\.(weight|bias)", r"refiners.\1.norm.\2"),
    Rule(_P + r"output_proj\.0\.(weight|bias)", r"output_proj.\1"),
    Rule(_P + r"output_proj\.1\.(weight|bias)", r"output_norm.\1"),
)


def config_from_checkpoint(shapes: dict, checkpoint_config: dict, diffusers_config=None) -> dict:
    """Every dimension from the tensor shapes; ``checkpoint_config`` is only cross-checked."""
    compress_dim, hidden_size = shapes[PREFIX + "input_compress.0.weight"]
    output_dim = shapes[PREFIX + "output_proj.0.weight"][0]
    (num_layers,) = shapes[PREFIX + "layer_weights"]
    refiner_indices = sorted(
        {int(m.group(1)) for name in shapes if (m := re.match(_REFINER, name))}
    )
    if refiner_indices != list(range(len(refiner_indices))):
        raise ValueError(f"MCP refiner indices are not contiguous: {refiner_indices}")
    config = {
        "hidden_size": int(hidden_size),
        "compress_dim": int(compress_dim),
        "output_dim": int(output_dim),
        "num_layers": int(num_layers),
        "num_refiners": len(refiner_indices),
        "reduction": 4,
        "kernel_size": 3,
    }
    if refiner_indices:
        first = PREFIX + "sequence_refiners.0."
        attention_dim = shapes[first + "channel_attn.fc.0.weight"][0]
        if compress_dim % attention_dim:
            raise ValueError(f"channel attention width {attention_dim} does not divide {compress_dim}")
        config["reduction"] = int(compress_dim // attention_dim)
        config["kernel_size"] = int(shapes[first + "conv.depthwise.weight"][-1])
    lm_hidden = checkpoint_config.get("hidden_size")
    if lm_hidden is not None and int(lm_hidden) != config["hidden_size"]:
        raise ValueError(
            f"MCP input width {config['hidden_size']} != LM hidden_size {lm_hidden} in config.json"
        )
    return config


def convert(names, get, config):
    return convert_with_rules(RULES, names, get)
