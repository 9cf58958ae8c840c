"""Compact PyTorch FastViTHD in the checkpoint's fused form, written from docs/reference-model.md §2.1.

NCHW, as the original. ``state_dict()`` names are exactly the checkpoint's
(after ``model.vision_tower.vision_tower.model.``), including the unused
``head.proj``. Unlike the checkpoint's other parts, the ConvFFN keeps its
BatchNorm unfused (as the released file does), so the converter's folding is
what the parity test exercises. Call ``.eval()`` before use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ReferenceConfig:
    widths: list = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    depths: list = field(default_factory=lambda: [2, 12, 24, 4, 2])
    mixers: list = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2)
    pos_embeds: list = field(default_factory=lambda: [False, False, False, True, True])
    mlp_ratio: int = 4
    head_dim: int = 32
    expansion: int = 2  # conv_exp widens the last stage by this factor
    se_ratio: float = 0.0625
    clip_dim: int = 768  # head.proj output (unused)


def depthwise(in_channels: int, out_channels: int, kernel: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=in_channels, bias=bias)


class Fused(nn.Module):
    """A re-parameterised conv: ``reparam_conv`` (+ bias), optionally followed by GELU."""

    def __init__(self, conv: nn.Conv2d, activation: bool = True):
        super().__init__()
        self.reparam_conv = conv
        self.activation = activation

    def forward(self, x):
        x = self.reparam_conv(x)
        return F.gelu(x) if self.activation else x


class LargeKernel(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.lkb_reparam = conv

    def forward(self, x):
        return F.gelu(self.lkb_reparam(x))


class ConvBN(nn.Module):
    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.conv = depthwise(dims, dims, kernel, bias=False)
        self.bn = nn.BatchNorm2d(dims)  # eps 1e-5

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvFFN(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.conv = ConvBN(dims, 7)
        self.fc1 = nn.Conv2d(dims, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dims, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.token_mixer = Fused(depthwise(dims, dims, 3), activation=False)
        self.convffn = ConvFFN(dims, hidden)
        self.layer_scale = nn.Parameter(torch.full((dims, 1, 1), 1e-5))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of NCHW, per pixel."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.bias = nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Attention(nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.heads = dims // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dims, 3 * dims, bias=False)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    def __init__(self, dims: int, hidden: int, head_dim: int):
        super().__init__()
        self.norm = ChannelLayerNorm(dims)
        self.token_mixer = Attention(dims, head_dim)
        self.convffn = ConvFFN(dims, hidden)
        self.layer_scale_1 = nn.Parameter(torch.full((dims, 1, 1), 1e-5))
        self.layer_scale_2 = nn.Parameter(torch.full((dims, 1, 1), 1e-5))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class Downsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            LargeKernel(depthwise(in_channels, out_channels, 7, stride=2)),
            Fused(nn.Conv2d(out_channels, out_channels, 1)),
        )

    def forward(self, x):
        return self.proj(x)


class SqueezeExcite(nn.Module):
    def __init__(self, dims: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(dims, reduced, 1)
        self.expand = nn.Conv2d(reduced, dims, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class ConvExpansion(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, se_width: int):
        super().__init__()
        self.reparam_conv = depthwise(in_channels, out_channels, 3)
        self.se = SqueezeExcite(out_channels, se_width)

    def forward(self, x):
        return F.gelu(self.se(self.reparam_conv(x)))


class ClipHead(nn.Module):
    def __init__(self, dims: int, clip_dim: int):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(dims, clip_dim))


class FastViTHDReference(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        c = config
        stem = c.widths[0]
        self.patch_embed = nn.Sequential(
            Fused(nn.Conv2d(3, stem, 3, 2, 1)),
            Fused(depthwise(stem, stem, 3, stride=2)),
            Fused(nn.Conv2d(stem, stem, 1)),
        )
        network = []
        for i, (dims, depth, mixer) in enumerate(zip(c.widths, c.depths, c.mixers)):
            if i > 0:
                network.append(Downsample(c.widths[i - 1], dims))
            if c.pos_embeds[i]:
                network.append(Fused(depthwise(dims, dims, 7), activation=False))  # RepCPE
            hidden = c.mlp_ratio * dims
            if mixer == "repmixer":
                blocks = [RepMixerBlock(dims, hidden) for _ in range(depth)]
            else:
                blocks = [AttentionBlock(dims, hidden, c.head_dim) for _ in range(depth)]
            network.append(nn.Sequential(*blocks))
        self.network = nn.ModuleList(network)
        exp = c.widths[-1] * c.expansion
        self.conv_exp = ConvExpansion(c.widths[-1], exp, int(exp * c.se_ratio))
        self.head = ClipHead(exp, c.clip_dim)

    def forward(self, pixels):
        """``pixels`` [B, 3, H, W] -> conv_exp features flattened, [B, H/64 · W/64, C]."""
        x = self.patch_embed(pixels)
        for entry in self.network:
            x = entry(x)
        x = self.conv_exp(x)
        return x.flatten(2).transpose(1, 2)


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give the parts that default to trivial values (BatchNorm statistics and
    affine, layer scales, norms, biases) non-trivial ones."""

    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            uniform(tensor, 0.5, 2.0)
        elif name.endswith("running_mean") or name.endswith("bias"):
            uniform(tensor, -0.5, 0.5)
        elif ".bn.weight" in name or ".norm.weight" in name:
            uniform(tensor, 0.5, 1.5)
        elif "layer_scale" in name:
            uniform(tensor, -1.0, 1.0)
        elif name == "head.proj":
            tensor.normal_(generator=generator)
    return model
