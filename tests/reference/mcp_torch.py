"""Compact PyTorch Mobile Conditioning Projector written from docs/reference-model.md §2.4.

Its ``state_dict()`` keys are the checkpoint's names after the
``model.diffusion_connector.fusion.`` prefix (``temperature`` is a persistent
buffer). Sequences are [B, S, C]; convs run channels-first as in PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBranch(nn.Module):
    """Depthwise Conv1d (k, pad k//2, no bias) -> 1x1 Conv1d (no bias) -> LayerNorm over C."""

    def __init__(self, channels: int, kernel_size: int, eps: float):
        super().__init__()
        self.depthwise = nn.Conv1d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )
        self.pointwise = nn.Conv1d(channels, channels, 1, bias=False)
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, C]
        y = self.pointwise(self.depthwise(x.transpose(1, 2))).transpose(1, 2)
        return self.norm(y)


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.Hardswish(),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1)).unsqueeze(1)


class SequenceRefinementBlock(nn.Module):
    def __init__(self, channels: int, reduction: int, kernel_size: int, eps: float):
        super().__init__()
        self.conv = ConvBranch(channels, kernel_size, eps)
        self.activation = nn.Hardswish()
        self.channel_attn = ChannelAttention(channels, reduction)
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.channel_attn(self.activation(self.conv(x)))
        return self.norm(y + x)


class TorchMobileConditioningProjector(nn.Module):
    def __init__(
        self,
        hidden_size: int = 896,
        compress_dim: int = 512,
        output_dim: int = 2304,
        num_layers: int = 4,
        num_refiners: int = 2,
        reduction: int = 4,
        kernel_size: int = 3,
        temperature: float = 2.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.linspace(0.8, 1.2, num_layers))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.input_compress = nn.Sequential(
            nn.Linear(hidden_size, compress_dim), nn.LayerNorm(compress_dim, eps=eps), nn.Hardswish()
        )
        self.sequence_refiners = nn.ModuleList(
            SequenceRefinementBlock(compress_dim, reduction, kernel_size, eps)
            for _ in range(num_refiners)
        )
        self.output_proj = nn.Sequential(
            nn.Linear(compress_dim, output_dim), nn.LayerNorm(output_dim, eps=eps)
        )

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.softmax(self.layer_weights / self.temperature, dim=0)
        fused = sum(w * h for w, h in zip(weights, hidden_states))
        x = self.input_compress(fused)
        for refiner in self.sequence_refiners:
            x = refiner(x)
        return self.output_proj(x)
