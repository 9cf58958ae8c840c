"""DC-AE f32c32 decoder: diffusers' ``AutoencoderDC`` decoder (docs/reference-model.md §2.6).

``DCAEDecoder(latents) -> image``: latents ``[B, h, w, latent_channels]`` (NHWC, already
divided by ``scaling_factor`` by the caller) -> image ``[B, 32h, 32w, 3]`` in about
[-1, 1], not clamped. How to run it on large images (exact row bands, blended tiles) is
``mobileo_mlx.decoding``'s business.

Module structure and parameter paths are diffusers' decoder's (``conv_in``,
``up_blocks.<stage>.<layer>``, ``conv1``/``conv2``/``norm``, ``attn.to_q``,
``to_qkv_multiscale.<k>.proj_in``/``proj_out``, ``conv_out.conv_inverted``, ``norm_out``,
``conv_out``); stage 0 is the highest resolution and runs last. Layout notes (diffusers is
NCHW, this is NHWC):

* the 1x1 convolutions are ``nn.Linear`` over channels (they can be quantized), the grouped
  1x1 ``proj_out`` a batched matmul over its groups;
* ``repeat_interleave(x, r, dim=channels)`` puts input channel ``c`` at output channels
  ``c*r .. c*r + r-1``: a broadcast over a new trailing axis;
* ``pixel_shuffle(x, 2)`` reads input channel ``c*4 + 2*i + j`` into output channel ``c`` at
  sub-pixel ``(i, j)``: split channels as ``[c, i, j]``;
* LiteMLA reshapes the concatenated ``[q|k|v|multiscale q|k|v]`` channels into consecutive
  groups of ``3*head_dim`` channels and splits *each group* in thirds (q, k, v); that
  interleaved grouping is reproduced exactly.

``row_halo`` / ``row_scale`` on a module say that its output row r reads only input rows
within ``row_halo`` of ``r // row_scale``: what lets ``decoding.decode_in_row_bands`` run it
band by band, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, DepthwiseConv, RMSNorm, ReLULinearAttention, activation
from .sana import GLUMBConv

# Total upsampling factor of the f32 decoder (five x2 upsample stages).
SPATIAL_SCALE = 32
ATTENTION_EPS = 1e-15  # SanaMultiscaleLinearAttention's eps in both attention forms


def _per_stage(value, num_stages: int) -> tuple:
    """diffusers accepts one value for all stages or one per stage."""
    if isinstance(value, str):
        return (value,) * num_stages
    return tuple(value)


@dataclass
class DCAEDecoderConfig(BaseModelArgs):
    latent_channels: int = 32
    image_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    norm_types: tuple = ("rms_norm",) * 6
    act_fns: tuple = ("silu",) * 6
    attention_head_dim: int = 32
    upsample_block_type: str = "interpolate"  # or "pixel_shuffle"
    in_shortcut: bool = True
    conv_act_fn: str = "relu"
    # Not used by the decoder: the pipeline divides latents by it before decoding.
    scaling_factor: float = 0.41407

    def __post_init__(self) -> None:
        stages = len(self.block_out_channels)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.block_types = _per_stage(self.block_types, stages)
        self.layers_per_block = tuple(int(n) for n in self.layers_per_block)
        self.qkv_multiscales = tuple(tuple(int(k) for k in ks) for ks in self.qkv_multiscales)
        self.norm_types = _per_stage(self.norm_types, stages)
        self.act_fns = _per_stage(self.act_fns, stages)


# ---------------------------------------------------------------- layout ops


def repeat_channels(x: mx.array, repeats: int) -> mx.array:
    """NHWC twin of ``repeat_interleave(x, repeats, dim=1)`` on NCHW."""
    if repeats == 1:
        return x
    *lead, channels = x.shape
    x = mx.broadcast_to(x[..., None], (*lead, channels, repeats))
    return x.reshape(*lead, channels * repeats)


def pixel_shuffle(x: mx.array, factor: int = 2) -> mx.array:
    """NHWC twin of ``F.pixel_shuffle``: channel ``c*f*f + i*f + j`` -> channel ``c``
    at sub-pixel ``(i, j)``."""
    b, h, w, channels = x.shape
    out = channels // (factor * factor)
    x = x.reshape(b, h, w, out, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [b, h, i, w, j, c]
    return x.reshape(b, h * factor, w * factor, out)


def upsample_nearest(x: mx.array, factor: int = 2) -> mx.array:
    """Nearest-neighbour upsampling by broadcasting (``F.interpolate(mode="nearest")``)."""
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


# ---------------------------------------------------------------- layers


class GroupedPointwise(nn.Module):
    """Grouped 1x1 conv without bias, weight [C_out, C_in / groups] (equal group sizes).

    A batched matmul over the groups: each group's channels times its [size, size] weight."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = mx.zeros((channels, channels // groups))

    def __call__(self, x: mx.array) -> mx.array:
        *lead, channels = x.shape
        size = channels // self.groups
        weight = self.weight.reshape(self.groups, size, size).swapaxes(1, 2)  # [g, in, out]
        y = x.reshape(*lead, self.groups, 1, size) @ weight
        return y.reshape(*lead, channels)


class ResBlock(nn.Module):
    """3x3 conv (+b) -> act -> 3x3 conv (no bias) -> RMSNorm -> + x."""

    row_halo, row_scale = 2, 1  # two 3x3 convs

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, act_fn: str):
        super().__init__()
        if norm_type != "rms_norm":
            raise ValueError(f"unsupported norm type {norm_type!r} (only 'rms_norm')")
        self.nonlinearity = activation(act_fn)
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = RMSNorm(out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(self.conv2(self.nonlinearity(self.conv1(x)))) + x


class SanaMultiscaleAttentionProjection(nn.Module):
    """LiteMLA's aggregation branch: depthwise kxk, then a grouped 1x1 (one group per head of q, k, v)."""

    def __init__(self, in_channels: int, num_attention_heads: int, kernel_size: int):
        super().__init__()
        channels = 3 * in_channels
        self.proj_in = DepthwiseConv(channels, channels, kernel_size, bias=False)
        self.proj_out = GroupedPointwise(channels, 3 * num_attention_heads)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj_out(self.proj_in(x))


def relu_quadratic_attention(q: mx.array, k: mx.array, v: mx.array, eps: float = ATTENTION_EPS) -> mx.array:
    """The same ReLU-kernel attention as ``ReLULinearAttention``, evaluated through the
    [N, N] score matrix; diffusers takes this form when H*W <= head_dim.
    q, k, v: [B, heads, N, d]; scores in float32, result in v's dtype."""
    q = mx.maximum(q.astype(mx.float32), 0)
    k = mx.maximum(k.astype(mx.float32), 0)
    scores = q @ k.swapaxes(-1, -2)  # [B, heads, N_q, N_k]
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + eps)
    return scores.astype(v.dtype) @ v


class SanaMultiscaleLinearAttention(nn.Module):
    """Multi-scale ReLU linear attention (LiteMLA), with the residual connection."""

    def __init__(self, in_channels: int, attention_head_dim: int, kernel_sizes: Sequence[int], norm_type: str):
        super().__init__()
        if norm_type != "rms_norm":
            raise ValueError(f"unsupported norm type {norm_type!r} (only 'rms_norm')")
        heads = in_channels // attention_head_dim
        inner = heads * attention_head_dim
        self.attention_head_dim = attention_head_dim
        self.to_q = nn.Linear(in_channels, inner, bias=False)
        self.to_k = nn.Linear(in_channels, inner, bias=False)
        self.to_v = nn.Linear(in_channels, inner, bias=False)
        self.to_qkv_multiscale = [SanaMultiscaleAttentionProjection(inner, heads, k) for k in kernel_sizes]
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), in_channels, bias=False)
        self.norm_out = RMSNorm(in_channels)
        self.linear_attention = ReLULinearAttention(ATTENTION_EPS)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, _ = x.shape
        d = self.attention_head_dim
        qkv = mx.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        branches = [qkv] + [branch(qkv) for branch in self.to_qkv_multiscale]
        qkv = mx.concatenate(branches, axis=-1) if len(branches) > 1 else qkv
        # Interleaved grouping: consecutive 3*d channels form one "head"; its
        # thirds are that head's q, k and v (diffusers' chunk along them).
        qkv = qkv.reshape(b, h * w, -1, 3 * d).transpose(0, 2, 1, 3)  # [B, G, N, 3d]
        q, k, v = mx.split(qkv, 3, axis=-1)
        if h * w > d:  # diffusers' condition for the linear (fp32) form
            out = self.linear_attention(q, k, v)
        else:
            out = relu_quadratic_attention(q, k, v, ATTENTION_EPS)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, -1)  # channel = group * d + i
        return self.norm_out(self.to_out(out)) + x


class EfficientViTBlock(nn.Module):
    def __init__(self, in_channels: int, attention_head_dim: int, qkv_multiscales: Sequence[int], norm_type: str):
        super().__init__()
        self.attn = SanaMultiscaleLinearAttention(in_channels, attention_head_dim, qkv_multiscales, norm_type)
        self.conv_out = GLUMBConv(in_channels, in_channels, norm_type="rms_norm")

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv_out(self.attn(x))


class DCUpBlock2d(nn.Module):
    """diffusers' ``DCUpBlock2d`` with its shortcut: ``pixel_shuffle(repeat_interleave(x))``
    added to nearest x2 -> 3x3 conv (``interpolate``) or 3x3 conv -> pixel_shuffle."""

    row_halo, row_scale = 1, 2  # one 3x3 conv, output at twice the rows

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool):
        super().__init__()
        self.interpolate = interpolate
        self.repeats = out_channels * 4 // in_channels
        conv_out = out_channels if interpolate else out_channels * 4
        self.conv = nn.Conv2d(in_channels, conv_out, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.interpolate:
            y = self.conv(upsample_nearest(x))
        else:
            y = pixel_shuffle(self.conv(x))
        return y + pixel_shuffle(repeat_channels(x, self.repeats))


def get_block(config: DCAEDecoderConfig, stage: int) -> nn.Module:
    block_type = config.block_types[stage]
    channels = config.block_out_channels[stage]
    if block_type == "ResBlock":
        return ResBlock(channels, channels, config.norm_types[stage], config.act_fns[stage])
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, config.attention_head_dim, config.qkv_multiscales[stage],
                                 config.norm_types[stage])
    raise ValueError(f"unsupported decoder block type {block_type!r}")


class DCAEDecoder(nn.Module):
    """diffusers' ``AutoencoderDC`` decoder (``Decoder``)."""

    head_row_halo = 1  # norm_out -> conv_act -> conv_out: one 3x3 conv

    def __init__(self, config: DCAEDecoderConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        stages = len(channels)
        if config.upsample_block_type not in ("interpolate", "pixel_shuffle"):
            raise ValueError(f"unsupported upsample_block_type {config.upsample_block_type!r}")
        if min(config.layers_per_block) < 1:
            raise ValueError("stages without layers are not supported (every stage needs >= 1 layer)")
        if config.in_shortcut and channels[-1] % config.latent_channels:
            raise ValueError(
                f"in_shortcut needs block_out_channels[-1] ({channels[-1]}) to be a multiple "
                f"of latent_channels ({config.latent_channels})"
            )

        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        interpolate = config.upsample_block_type == "interpolate"
        # up_blocks[i] is stage i (output channels channels[i]); stages run from the
        # last (latent resolution) to stage 0, as in diffusers.
        self.up_blocks = []
        for i in range(stages):
            stage = []
            if i < stages - 1:
                stage.append(DCUpBlock2d(channels[i + 1], channels[i], interpolate))
            stage.extend(get_block(config, i) for _ in range(config.layers_per_block[i]))
            self.up_blocks.append(stage)
        self.norm_out = RMSNorm(channels[0])
        self.conv_act = activation(config.conv_act_fn)
        self.conv_out = nn.Conv2d(channels[0], config.image_channels, 3, padding=1)

    def embed(self, latents: mx.array) -> mx.array:
        """``conv_in`` and the input shortcut."""
        x = self.conv_in(latents)
        if self.config.in_shortcut:
            x = x + repeat_channels(latents, x.shape[-1] // latents.shape[-1])
        return x

    def head(self, x: mx.array) -> mx.array:
        """``norm_out`` -> ``conv_act`` -> ``conv_out``."""
        return self.conv_out(self.conv_act(self.norm_out(x)))

    def __call__(self, latents: mx.array) -> mx.array:
        x = self.embed(latents)
        for stage in reversed(self.up_blocks):
            for layer in stage:
                x = layer(x)
        return self.head(x)
