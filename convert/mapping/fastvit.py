"""FastViTHD vision tower: checkpoint names -> ``FastViTHD`` names (docs/reference-model.md §1.3, §2.1).

The checkpoint holds the fused (inference-mode) tower under
``model.vision_tower.vision_tower.model.``. Runtime names keep the
``network.N`` numbering and drop the ``reparam_conv`` / ``lkb_reparam``
wrappers; conv weights go OIHW -> OHWI, 1x1 convs become Linear weights and
the ``[C, 1, 1]`` layer scales become ``[C]`` vectors (NHWC broadcasting).

The ConvFFN ``conv.conv`` + ``conv.bn`` pairs are the only unfused parts:
``convert`` folds each BatchNorm (eval statistics) into its depthwise conv,
which then gains a bias. The unused CLIP head and the BatchNorm step
counters are ignored.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from mobileo_mlx.convert.mapping import Rule, conv2d, convert_with_rules, pointwise

PREFIX = "model.vision_tower.vision_tower.model."
_P = re.escape(PREFIX)

KEYS = re.compile(_P)
IGNORE = re.compile(_P + r"(?:head\.|.*\.num_batches_tracked$)")

BATCHNORM_EPS = 1e-5  # torch.nn.BatchNorm2d default, used by the reference
HEAD_DIM = 32  # MCi attention head width; the qkv shape cannot tell it


def channel_vector(w: np.ndarray) -> np.ndarray:
    """A per-channel ``[C, 1, 1]`` layer scale -> ``[C]``."""
    if w.size != w.shape[0]:
        raise ValueError(f"expected a per-channel tensor, got shape {w.shape}")
    return np.ascontiguousarray(w.reshape(w.shape[0]))


_BLOCK = _P + r"network\.(\d+)\.(\d+)\."
RULES = (
    # Stem: full 3x3 conv, depthwise 3x3, 1x1 (a Linear at runtime).
    Rule(_P + r"patch_embed\.([01])\.reparam_conv\.weight", r"patch_embed.\1.weight", conv2d),
    Rule(_P + r"patch_embed\.2\.reparam_conv\.weight", r"patch_embed.2.weight", pointwise),
    Rule(_P + r"patch_embed\.([012])\.reparam_conv\.bias", r"patch_embed.\1.bias"),
    # Blocks (both kinds).
    Rule(_BLOCK + r"(layer_scale(?:_[12])?)", r"network.\1.\2.\3", channel_vector),
    Rule(_BLOCK + r"convffn\.(fc[12])\.weight", r"network.\1.\2.convffn.\3.weight", pointwise),
    Rule(_BLOCK + r"convffn\.(fc[12])\.bias", r"network.\1.\2.convffn.\3.bias"),
    # RepMixer blocks.
    Rule(_BLOCK + r"token_mixer\.reparam_conv\.weight", r"network.\1.\2.token_mixer.weight", conv2d),
    Rule(_BLOCK + r"token_mixer\.reparam_conv\.bias", r"network.\1.\2.token_mixer.bias"),
    # Attention blocks (qkv / proj are already Linear weights).
    Rule(_BLOCK + r"norm\.(weight|bias)", r"network.\1.\2.norm.\3"),
    Rule(_BLOCK + r"token_mixer\.qkv\.weight", r"network.\1.\2.token_mixer.qkv.weight"),
    Rule(_BLOCK + r"token_mixer\.proj\.(weight|bias)", r"network.\1.\2.token_mixer.proj.\3"),
    # Downsamplers: grouped large-kernel conv, then a 1x1 MobileOne conv.
    Rule(_P + r"network\.(\d+)\.proj\.0\.lkb_reparam\.weight", r"network.\1.conv.weight", conv2d),
    Rule(_P + r"network\.(\d+)\.proj\.0\.lkb_reparam\.bias", r"network.\1.conv.bias"),
    Rule(_P + r"network\.(\d+)\.proj\.1\.reparam_conv\.weight", r"network.\1.pointwise.weight", pointwise),
    Rule(_P + r"network\.(\d+)\.proj\.1\.reparam_conv\.bias", r"network.\1.pointwise.bias"),
    # RepCPE.
    Rule(_P + r"network\.(\d+)\.reparam_conv\.weight", r"network.\1.conv.weight", conv2d),
    Rule(_P + r"network\.(\d+)\.reparam_conv\.bias", r"network.\1.conv.bias"),
    # conv_exp and its squeeze-excite.
    Rule(_P + r"conv_exp\.reparam_conv\.weight", r"conv_exp.conv.weight", conv2d),
    Rule(_P + r"conv_exp\.reparam_conv\.bias", r"conv_exp.conv.bias"),
    Rule(_P + r"conv_exp\.se\.(reduce|expand)\.weight", r"conv_exp.se.\1.weight", pointwise),
    Rule(_P + r"conv_exp\.se\.(reduce|expand)\.bias", r"conv_exp.se.\1.bias"),
)

# ConvFFN conv + BatchNorm tensors, folded together by ``convert`` (no RULE).
_FFN_CONV = re.compile(
    _P + r"(network\.\d+\.\d+\.convffn\.conv)\.(conv\.weight|bn\.(?:weight|bias|running_mean|running_var))"
)
_FFN_CONV_PARTS = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def fold_batchnorm(
    weight: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BATCHNORM_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """BN(conv(x)) with a bias-free conv -> (weight, bias) of one conv, in float64 then float32."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    folded_weight = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def convert(
    names: Iterable[str], get: Callable[[str], np.ndarray], config: Mapping
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the tower's tensors; each ConvFFN conv is emitted, BN folded, once
    its five tensors have been seen (so at most one block's worth is held)."""
    pending: dict[str, dict[str, str]] = {}
    for name in names:
        if IGNORE.match(name):
            continue
        match = _FFN_CONV.fullmatch(name)
        if match is None:
            yield from convert_with_rules(RULES, (name,), get)
            continue
        target, part = match.groups()
        parts = pending.setdefault(target, {})
        parts[part] = name
        if len(parts) == len(_FFN_CONV_PARTS):
            del pending[target]
            weight, bias = fold_batchnorm(*(get(parts[p]) for p in _FFN_CONV_PARTS))
            yield f"{target}.weight", conv2d(weight)
            yield f"{target}.bias", bias
    if pending:
        raise KeyError(f"incomplete ConvFFN conv/BatchNorm tensors for {sorted(pending)}")


_NETWORK_ENTRY = re.compile(r"network\.(\d+)\.(.+)")


def _entry_kind(rest: str) -> str:
    if re.match(r"\d+\.", rest):
        return "stage"
    if rest.startswith("proj."):
        return "downsample"
    if rest.startswith("reparam_conv."):
        return "pos_embed"
    raise ValueError(f"unknown FastViT network entry 'network.N.{rest}'")


def _expected_kinds(num_stages: int, pos_embeds: list[bool]) -> list[str]:
    """The ``network`` layout the runtime builds (``fastvit.build_network``)."""
    kinds = []
    for stage in range(num_stages):
        if stage > 0:
            kinds.append("downsample")
        if pos_embeds[stage]:
            kinds.append("pos_embed")
        kinds.append("stage")
    return kinds


def image_size_from_tower(tower: str | None, default: int = 1024) -> int:
    """``mobileclip_l_1024`` -> 1024 (the tower name ends in its input size)."""
    match = re.search(r"_(\d+)$", tower or "")
    return int(match.group(1)) if match else default


def config_from_checkpoint(
    shapes: Mapping[str, tuple], checkpoint_config: Mapping, diffusers_config=None
) -> dict:
    """The ``FastViTConfig`` dict, inferred from the tensor shapes."""
    s = {name[len(PREFIX) :]: tuple(shape) for name, shape in shapes.items() if name.startswith(PREFIX)}

    kinds: dict[int, str] = {}
    blocks: dict[int, set[int]] = {}
    for name in s:
        match = _NETWORK_ENTRY.fullmatch(name)
        if match is None:
            continue
        index, rest = int(match.group(1)), match.group(2)
        kind = _entry_kind(rest)
        if kinds.setdefault(index, kind) != kind:
            raise ValueError(f"network.{index} mixes {kinds[index]} and {kind} tensors")
        if kind == "stage":
            blocks.setdefault(index, set()).add(int(rest.split(".")[0]))
    if sorted(kinds) != list(range(len(kinds))):
        raise ValueError(f"FastViT network entries are not contiguous: {sorted(kinds)}")
    layout = [kinds[i] for i in range(len(kinds))]

    stage_indices = [i for i, kind in enumerate(layout) if kind == "stage"]
    widths, depths, mixers, mlp_ratios, pos_embeds = [], [], [], [], []
    for index in stage_indices:
        depth = len(blocks[index])
        if blocks[index] != set(range(depth)):
            raise ValueError(f"network.{index} blocks are not contiguous: {sorted(blocks[index])}")
        dims, hidden = s[f"network.{index}.0.convffn.fc2.weight"][:2]
        if hidden % dims:
            raise ValueError(f"network.{index}: ConvFFN width {hidden} is not a multiple of {dims}")
        stage_mixers = set()
        for block in range(depth):
            if f"network.{index}.{block}.token_mixer.reparam_conv.weight" in s:
                stage_mixers.add("repmixer")
            elif f"network.{index}.{block}.token_mixer.qkv.weight" in s:
                stage_mixers.add("attention")
            else:
                raise ValueError(f"network.{index}.{block} has no known token mixer")
        if len(stage_mixers) != 1:
            raise ValueError(f"network.{index} mixes token mixers {sorted(stage_mixers)}")
        widths.append(int(dims))
        depths.append(depth)
        mixers.append(stage_mixers.pop())
        mlp_ratios.append(int(hidden // dims))
        pos_embeds.append(index > 0 and layout[index - 1] == "pos_embed")

    if layout != _expected_kinds(len(stage_indices), pos_embeds):
        raise ValueError(f"unexpected FastViT network layout {layout}")

    def kernel(name: str) -> int:
        return int(s[name][-1])

    def first(kind: str, suffix: str) -> str | None:
        return next((f"network.{i}.{suffix}" for i, k in enumerate(layout) if k == kind), None)

    def first_block(mixer: str, suffix: str) -> str | None:
        for stage, index in enumerate(stage_indices):
            if mixers[stage] == mixer:
                return f"network.{index}.0.{suffix}"
        return None

    for stage, dims in enumerate(widths):
        if mixers[stage] == "attention" and dims % HEAD_DIM:
            raise ValueError(f"attention width {dims} is not a multiple of head_dim {HEAD_DIM}")

    # Kernel sizes of parts a small config may lack fall back to FastViTHD's.
    defaults = {"mixer": 3, "downsample": 7, "pos_embed": 7}
    mixer_weight = first_block("repmixer", "token_mixer.reparam_conv.weight")
    downsample_weight = first("downsample", "proj.0.lkb_reparam.weight")
    pos_embed_weight = first("pos_embed", "reparam_conv.weight")
    mm_hidden_size, _, expansion_kernel, _ = s["conv_exp.reparam_conv.weight"]

    return {
        "image_size": image_size_from_tower(checkpoint_config.get("mm_vision_tower")),
        "widths": widths,
        "depths": depths,
        "mixers": mixers,
        "pos_embeds": pos_embeds,
        "mlp_ratios": mlp_ratios,
        "head_dim": HEAD_DIM,
        "stem_kernel_size": kernel("patch_embed.0.reparam_conv.weight"),
        "mixer_kernel_size": kernel(mixer_weight) if mixer_weight else defaults["mixer"],
        "ffn_kernel_size": kernel(f"network.{stage_indices[0]}.0.convffn.conv.conv.weight"),
        "downsample_kernel_size": kernel(downsample_weight) if downsample_weight else defaults["downsample"],
        "pos_embed_kernel_size": kernel(pos_embed_weight) if pos_embed_weight else defaults["pos_embed"],
        "expansion_kernel_size": int(expansion_kernel),
        "mm_hidden_size": int(mm_hidden_size),
        "se_width": int(s["conv_exp.se.reduce.weight"][0]),
        "norm_eps": 1e-5,
    }
