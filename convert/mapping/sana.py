"""SANA DiT: ``model.dit.*`` (diffusers ``SanaTransformer2DModel`` names) -> ``mobileo_mlx.models.sana``,
whose parameters carry the same names without the prefix.

Layout changes: 1x1 convs become Linear weights [O, I]; the patch-embedding
conv [D, C, p, p] becomes a Linear over (p, p, C)-flattened patches; the
depthwise 3x3 conv goes to MLX's OHWI. Everything else keeps its layout.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from mobileo_mlx.models.sana import TIMESTEP_CHANNELS, SanaConfig
from mobileo_mlx.weights import config_problem

from mobileo_mlx.convert.defaults import TRANSFORMER_CONFIG
from mobileo_mlx.convert.mapping import Rule, conv2d, convert_with_rules, pointwise

PREFIX = "model.dit."
KEYS = re.compile(r"^model\.dit\.")
IGNORE = None  # every DiT tensor is used (diffusers' sin-cos pos_embed buffer is never saved)


def patch_conv(w: np.ndarray) -> np.ndarray:
    """Patch conv [D, C, p, p] -> Linear [D, p*p*C] over (row, col, channel)-ordered patches."""
    return np.ascontiguousarray(conv2d(w).reshape(w.shape[0], -1))


_P = re.escape(PREFIX)
_BLOCK = r"transformer_blocks\.\d+\."
# Runtime names are diffusers' names without the prefix; only the layouts change.
RULES = (
    Rule(_P + r"(patch_embed\.proj\.weight)", r"\1", patch_conv),
    Rule(_P + "(" + _BLOCK + r"ff\.conv_(?:inverted|point)\.weight)", r"\1", pointwise),
    Rule(_P + "(" + _BLOCK + r"ff\.conv_depth\.weight)", r"\1", conv2d),
    Rule(_P + "(" + _BLOCK + r"(?:(?:attn[12]\.to_(?:[qkv]|out\.0)|norm2)\.(?:weight|bias)"
         r"|ff\.conv_(?:inverted|depth)\.bias|scale_shift_table))", r"\1"),
    Rule(_P + r"((?:patch_embed\.proj|proj_out|time_embed\.linear|time_embed\.emb\.timestep_embedder\.linear_[12]"
         r"|caption_projection\.linear_[12])\.(?:weight|bias)|caption_norm\.weight|scale_shift_table)", r"\1"),
)


def config_from_checkpoint(
    shapes: Mapping[str, tuple[int, ...]],
    checkpoint_config: dict | None,
    diffusers_config: dict | None,
) -> dict:
    """The runtime ``dit`` config: diffusers' transformer config (or the built-in
    SANA-600M one), checked against the checkpoint's tensor shapes.

    Raises ValueError naming the first config field that disagrees with a tensor.
    """
    transformer = (diffusers_config or {}).get("transformer") or TRANSFORMER_CONFIG
    problem = config_problem("dit", transformer, own_checks=False)
    if problem:
        raise ValueError(f"{problem.removeprefix('dit.')} (in the transformer config)")
    config = SanaConfig.from_dict(transformer)  # also rejects options the runtime lacks
    _check_shapes(config, shapes)
    return asdict(config)


def _check_shapes(config: SanaConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    def expect(name: str, shape: tuple[int, ...], fields: str) -> None:
        full = PREFIX + name
        if full not in shapes:
            raise ValueError(f"DiT checkpoint lacks {full} (needed to check {fields})")
        if tuple(shapes[full]) != tuple(shape):
            raise ValueError(
                f"DiT config ({fields}) expects {full} of shape {tuple(shape)}, "
                f"the checkpoint has {tuple(shapes[full])}"
            )

    def expect_present(name: str, present: bool, field: str) -> None:
        if (PREFIX + name in shapes) != present:
            state = "has" if not present else "lacks"
            raise ValueError(f"DiT config {field}={present} but the checkpoint {state} {PREFIX + name}")

    block_pattern = re.compile(_P + r"transformer_blocks\.(\d+)\.")
    block_indices = {int(m.group(1)) for m in map(block_pattern.match, shapes) if m}
    if block_indices != set(range(config.num_layers)):
        raise ValueError(
            f"DiT config num_layers={config.num_layers} but the checkpoint has "
            f"{len(block_indices)} transformer blocks (indices {sorted(block_indices)[:3]}...)"
        )

    dim, p = config.inner_dim, config.patch_size
    heads_dim = "num_attention_heads*attention_head_dim"
    cross_inner = config.num_cross_attention_heads * config.cross_attention_head_dim
    cross = "num_cross_attention_heads*cross_attention_head_dim"
    hidden = config.ffn_hidden_dim

    expect("patch_embed.proj.weight", (dim, config.in_channels, p, p), f"{heads_dim}, in_channels, patch_size")
    expect("time_embed.emb.timestep_embedder.linear_1.weight", (dim, TIMESTEP_CHANNELS), heads_dim)
    expect("time_embed.linear.weight", (6 * dim, dim), heads_dim)
    expect("caption_projection.linear_1.weight", (dim, config.caption_channels), f"{heads_dim}, caption_channels")
    expect("caption_norm.weight", (dim,), heads_dim)
    expect("scale_shift_table", (2, dim), heads_dim)
    expect("proj_out.weight", (p * p * config.out_channels, dim), f"{heads_dim}, out_channels, patch_size")
    for i in range(config.num_layers):
        block = f"transformer_blocks.{i}."
        expect(block + "attn1.to_q.weight", (dim, dim), heads_dim)
        expect_present(block + "attn1.to_q.bias", config.attention_bias, "attention_bias")
        expect(block + "attn2.to_q.weight", (cross_inner, dim), f"{cross}, {heads_dim}")
        expect(block + "attn2.to_k.weight", (cross_inner, config.cross_attention_dim), f"{cross}, cross_attention_dim")
        expect(block + "attn2.to_out.0.weight", (dim, cross_inner), f"{cross}, {heads_dim}")
        expect_present(block + "norm2.weight", config.norm_elementwise_affine, "norm_elementwise_affine")
        expect(block + "ff.conv_inverted.weight", (2 * hidden, dim, 1, 1), f"mlp_ratio, {heads_dim}")
        expect(block + "ff.conv_depth.weight", (2 * hidden, 1, 3, 3), "mlp_ratio")
        expect(block + "ff.conv_point.weight", (dim, hidden, 1, 1), f"mlp_ratio, {heads_dim}")
        expect(block + "scale_shift_table", (6, dim), heads_dim)


def convert(
    names: Iterable[str], get: Callable[[str], np.ndarray], config: dict
) -> Iterator[tuple[str, np.ndarray]]:
    return convert_with_rules(RULES, names, get)
