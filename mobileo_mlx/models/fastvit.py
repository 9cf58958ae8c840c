"""FastViTHD vision encoder ("MCi", MobileCLIP-L), in its fused inference form
(docs/reference-model.md §2.1).

Images are NHWC in [0, 1]. The output is the ``conv_exp`` feature map
flattened row-major, ``[B, (H/64)·(W/64), mm_hidden_size]`` (256 tokens of
3072 at 1024²); the CLIP head is never computed.

Every re-parameterisable branch is already folded in the checkpoint (the
RepMixer and RepCPE identities included), and the converter folds the ConvFFN
BatchNorms, so each spatial mixer here is a single conv with bias. Parameter
paths keep the checkpoint's ``network.N`` numbering (stages, downsamplers
and conditional position encodings share one list), which keeps the weight
mapping static.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, DepthwiseConv, ScaledDotProductAttention

# FastViT's layer-scale initial value (randomly initialised models only).
LAYER_SCALE_INIT = 1e-5


@dataclass
class FastViTConfig(BaseModelArgs):
    """FastViTHD sizes (defaults: the released MobileCLIP-L tower, docs/reference-model.md §2.1)."""

    image_size: int = 1024
    widths: List[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    depths: List[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    mixers: List[str] = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2)
    # A RepCPE (conditional position encoding) runs before these stages.
    pos_embeds: List[bool] = field(default_factory=lambda: [False, False, False, True, True])
    mlp_ratios: List[int] = field(default_factory=lambda: [4] * 5)
    head_dim: int = 32
    stem_kernel_size: int = 3
    mixer_kernel_size: int = 3
    ffn_kernel_size: int = 7
    downsample_kernel_size: int = 7
    pos_embed_kernel_size: int = 7
    expansion_kernel_size: int = 3
    mm_hidden_size: int = 3072
    se_width: int = 192
    norm_eps: float = 1e-5

    def __post_init__(self):
        per_stage = (self.depths, self.mixers, self.pos_embeds, self.mlp_ratios)
        if any(len(values) != len(self.widths) for values in per_stage):
            raise ValueError("widths, depths, mixers, pos_embeds and mlp_ratios need one entry per stage")
        unknown = set(self.mixers) - {"repmixer", "attention"}
        if unknown:
            raise ValueError(f"unknown token mixers {sorted(unknown)}")

    @property
    def num_tokens(self) -> int:
        """Output tokens per image at ``image_size`` (five stride-2 steps plus the stem's two)."""
        return (self.image_size // 64) ** 2


class ConvFFN(nn.Module):
    """Depthwise conv (its BatchNorm folded in by the converter) -> 1x1 up -> GELU -> 1x1 down."""

    def __init__(self, dims: int, hidden_dims: int, kernel_size: int):
        super().__init__()
        self.conv = DepthwiseConv(dims, dims, kernel_size)
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, config: FastViTConfig):
        super().__init__()
        # Fused x + ls·(mixer(x) − norm(x)): one depthwise conv that replaces x.
        self.token_mixer = DepthwiseConv(dims, dims, config.mixer_kernel_size)
        self.convffn = ConvFFN(dims, hidden_dims, config.ffn_kernel_size)
        self.layer_scale = mx.full((dims,), LAYER_SCALE_INIT)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class Attention(nn.Module):
    """Multi-head self-attention over all H·W positions."""

    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        if dims % head_dim:
            raise ValueError(f"attention width {dims} is not a multiple of head_dim {head_dim}")
        self.num_heads = dims // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dims, 3 * dims, bias=False)
        self.proj = nn.Linear(dims, dims)
        self.attention = ScaledDotProductAttention()

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        # qkv channels are laid out [3, heads, head_dim].
        qkv = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, self.num_heads, -1)
        queries, keys, values = qkv.transpose(2, 0, 3, 1, 4)
        out = self.attention(queries, keys, values, self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, H, W, C))


class AttentionBlock(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, config: FastViTConfig):
        super().__init__()
        # LayerNorm over channels per pixel: the last axis in NHWC.
        self.norm = nn.LayerNorm(dims, eps=config.norm_eps)
        self.token_mixer = Attention(dims, config.head_dim)
        self.convffn = ConvFFN(dims, hidden_dims, config.ffn_kernel_size)
        self.layer_scale_1 = mx.full((dims,), LAYER_SCALE_INIT)
        self.layer_scale_2 = mx.full((dims,), LAYER_SCALE_INIT)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class Downsample(nn.Module):
    """Grouped large-kernel conv, stride 2 (groups = in_channels) -> GELU -> 1x1 -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = DepthwiseConv(in_channels, out_channels, kernel_size, stride=2)
        self.pointwise = nn.Linear(out_channels, out_channels)
        self.act = nn.GELU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.pointwise(self.act(self.conv(x))))


class ConvPositionEncoding(nn.Module):
    """RepCPE: a depthwise conv that replaces x (the identity is folded into it)."""

    def __init__(self, dims: int, kernel_size: int):
        super().__init__()
        self.conv = DepthwiseConv(dims, dims, kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class SqueezeExcite(nn.Module):
    def __init__(self, dims: int, reduced_dims: int):
        super().__init__()
        self.reduce = nn.Linear(dims, reduced_dims)
        self.expand = nn.Linear(reduced_dims, dims)
        self.gate = nn.Sigmoid()

    def __call__(self, x: mx.array) -> mx.array:
        # Spatial mean, accumulated in fp32. (The reference pools with a fixed
        # 16x16 window, which is the full map at its 1024² input.)
        pooled = mx.mean(x.astype(mx.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        return x * self.gate(self.expand(nn.relu(self.reduce(pooled))))


class ConvExpansion(nn.Module):
    """``conv_exp``: grouped conv (groups = in_channels) widening the channels, SE, GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, se_width: int):
        super().__init__()
        self.conv = DepthwiseConv(in_channels, out_channels, kernel_size)
        self.se = SqueezeExcite(out_channels, se_width)
        self.act = nn.GELU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.se(self.conv(x)))


def build_network(config: FastViTConfig) -> list:
    """The ``network`` list in checkpoint order: stage 0, then for every later
    stage a downsampler, an optional RepCPE and the stage (a list of blocks)."""
    network = []
    for stage, (dims, depth, mixer, mlp_ratio) in enumerate(
        zip(config.widths, config.depths, config.mixers, config.mlp_ratios)
    ):
        if stage > 0:
            network.append(Downsample(config.widths[stage - 1], dims, config.downsample_kernel_size))
        if config.pos_embeds[stage]:
            network.append(ConvPositionEncoding(dims, config.pos_embed_kernel_size))
        block = RepMixerBlock if mixer == "repmixer" else AttentionBlock
        network.append([block(dims, mlp_ratio * dims, config) for _ in range(depth)])
    return network


class FastViTHD(nn.Module):
    def __init__(self, config: FastViTConfig):
        super().__init__()
        self.config = config
        stem_width, k = config.widths[0], config.stem_kernel_size
        # MobileOne stem (fused): full conv s2, depthwise conv s2, 1x1; GELU after each.
        self.patch_embed = [
            nn.Conv2d(3, stem_width, k, stride=2, padding=k // 2),
            DepthwiseConv(stem_width, stem_width, k, stride=2),
            nn.Linear(stem_width, stem_width),
        ]
        self.act = nn.GELU()  # after each stem layer
        self.network = build_network(config)
        self.conv_exp = ConvExpansion(
            config.widths[-1], config.mm_hidden_size, config.expansion_kernel_size, config.se_width
        )

    def __call__(self, pixels: mx.array) -> mx.array:
        """``pixels`` [B, H, W, 3] in [0, 1] -> features [B, (H/64)·(W/64), mm_hidden_size]."""
        x = pixels.astype(self.patch_embed[0].weight.dtype)
        for layer in self.patch_embed:
            x = self.act(layer(x))
        for entry in self.network:
            if isinstance(entry, list):
                for block in entry:
                    x = block(x)
            else:
                x = entry(x)
        x = self.conv_exp(x)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)
