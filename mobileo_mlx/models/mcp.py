"""Mobile Conditioning Projector (MCP): the last LM hidden states -> DiT caption features.

docs/reference-model.md §2.4. The last ``num_layers`` hidden states of the language model are fused
with ``softmax(layer_weights / temperature)`` (both read from the checkpoint),
compressed (Linear -> LayerNorm -> Hardswish), refined by a few sequence
refinement blocks and projected to the DiT caption width (Linear -> LayerNorm).
Sequences are [B, S, C]; any S works and nothing is padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, DepthwiseConv


@dataclass
class MCPConfig(BaseModelArgs):
    hidden_size: int = 896  # LM hidden size (input width)
    compress_dim: int = 512  # width inside the refiners
    output_dim: int = 2304  # DiT caption_channels
    num_layers: int = 4  # how many trailing LM hidden states are fused
    num_refiners: int = 2
    reduction: int = 4  # channel attention bottleneck = compress_dim // reduction
    kernel_size: int = 3  # depthwise conv over the sequence
    layer_norm_eps: float = 1e-5


def hardsigmoid(x: mx.array) -> mx.array:
    """relu6(x + 3) / 6."""
    return mx.minimum(mx.maximum(x + 3, 0), 6) / 6


class ChannelAttention(nn.Module):
    """Squeeze-excitation over the sequence: mean over S -> bottleneck -> per-channel gate."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.reduce = nn.Linear(channels, channels // reduction, bias=False)
        self.expand = nn.Linear(channels // reduction, channels, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        summary = x.mean(axis=1)  # [B, C]
        gate = hardsigmoid(self.expand(nn.hardswish(self.reduce(summary))))
        return x * gate[:, None, :]


class SequenceRefinementBlock(nn.Module):
    """depthwise conv -> pointwise -> LayerNorm -> Hardswish -> channel attention; LayerNorm(x + input)."""

    def __init__(self, channels: int, reduction: int, kernel_size: int, eps: float):
        super().__init__()
        self.depthwise = DepthwiseConv(channels, channels, kernel_size, bias=False, dims=1)  # over the sequence
        self.pointwise = nn.Linear(channels, channels, bias=False)
        self.conv_norm = nn.LayerNorm(channels, eps=eps)
        self.channel_attention = ChannelAttention(channels, reduction)
        self.norm = nn.LayerNorm(channels, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        y = nn.hardswish(self.conv_norm(self.pointwise(self.depthwise(x))))
        y = self.channel_attention(y)
        return self.norm(y + x)


class MobileConditioningProjector(nn.Module):
    def __init__(self, config: MCPConfig):
        super().__init__()
        self.config = config
        self.layer_weights = mx.zeros((config.num_layers,))
        # A 0-d array read from the checkpoint (2.0 unless annealed), kept at run time.
        self.temperature = mx.array(2.0)
        self.compress = nn.Linear(config.hidden_size, config.compress_dim)
        self.compress_norm = nn.LayerNorm(config.compress_dim, eps=config.layer_norm_eps)
        self.refiners = [
            SequenceRefinementBlock(
                config.compress_dim, config.reduction, config.kernel_size, config.layer_norm_eps
            )
            for _ in range(config.num_refiners)
        ]
        self.output_proj = nn.Linear(config.compress_dim, config.output_dim)
        self.output_norm = nn.LayerNorm(config.output_dim, eps=config.layer_norm_eps)

    def layer_fusion_weights(self) -> mx.array:
        """softmax(layer_weights / temperature), computed in float32."""
        logits = self.layer_weights.astype(mx.float32) / self.temperature.astype(mx.float32)
        return mx.softmax(logits, axis=-1)

    def __call__(self, hidden_states: Sequence[mx.array]) -> mx.array:
        """``hidden_states``: the last ``num_layers`` LM hidden states, oldest first,
        each [B, S, hidden_size] -> [B, S, output_dim]."""
        if len(hidden_states) != self.config.num_layers:
            raise ValueError(
                f"expected the last {self.config.num_layers} hidden states, got {len(hidden_states)}"
            )
        dtype = hidden_states[0].dtype
        weights = self.layer_fusion_weights().astype(dtype)
        fused = weights[0] * hidden_states[0]
        for weight, hidden in zip(weights[1:], hidden_states[1:]):
            fused = fused + weight * hidden
        x = nn.hardswish(self.compress_norm(self.compress(fused)))
        for refiner in self.refiners:
            x = refiner(x)
        return self.output_norm(self.output_proj(x))
