"""DC-AE f32c32 decoder (SPEC §2.6) with diffusers ``AutoencoderDC`` decoder semantics.

``DCAEDecoder(latents) -> image``: latents ``[B, h, w, latent_channels]`` (NHWC,
already divided by ``scaling_factor`` by the caller) -> image ``[B, 32h, 32w, 3]``
in about [-1, 1], not clamped. ``decode_tiled`` decodes overlapping latent tiles
and blends them with linear ramps, to bound memory at large sizes.

Layout notes (diffusers is NCHW, we are NHWC, channels last):

* ``repeat_interleave(x, r, dim=channels)`` puts input channel ``c`` at output
  channels ``c*r .. c*r + r-1``: a broadcast over a new trailing axis.
* ``pixel_shuffle(x, 2)`` reads input channel ``c*4 + 2*i + j`` into output
  channel ``c`` at sub-pixel ``(i, j)``: split channels as ``[c, i, j]``.
* LiteMLA reshapes the concatenated ``[q|k|v|multiscale q|k|v]`` channels into
  consecutive groups of ``3*head_dim`` channels and splits *each group* in
  thirds (q, k, v); that interleaved grouping is reproduced exactly (pitfall 4).

Runtime parameter names mirror diffusers' decoder names (``up_blocks.<stage>.<layer>``,
stage 0 = highest resolution, run last); 1x1 convolutions are ``nn.Linear`` over
channels, so they can be quantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mobileo_mlx.kernels.depthwise import depthwise_conv2d
from mobileo_mlx.kernels.linear_attention import relu_linear_attention

from . import activations
from .gated_conv import gated_depthwise_cpu

# Total upsampling factor of the f32 decoder (five x2 upsample stages).
SPATIAL_SCALE = 32
ATTENTION_EPS = 1e-15  # LiteMLA's eps in both attention forms
NORM_EPS = 1e-5


def _per_stage(value, num_stages: int) -> tuple:
    """diffusers accepts one value for all stages or one per stage."""
    if isinstance(value, str):
        return (value,) * num_stages
    return tuple(value)


@dataclass
class DCAEDecoderConfig:
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

    @classmethod
    def from_dict(cls, params: dict) -> "DCAEDecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


# ---------------------------------------------------------------- elementwise
# SiLU / GELU from models.activations (fast fp32 kernels on the CPU, MLX's built-ins on
# GPUs); norm epilogues fused with mx.compile (one pass instead of three).


def _silu(x: mx.array) -> mx.array:
    return activations.silu(x)


def _gated_silu(x: mx.array, gate: mx.array) -> mx.array:
    return activations.glu_silu(x, gate)


@mx.compile
def _bias_residual(y: mx.array, bias: mx.array, x: mx.array) -> mx.array:
    return x + (y + bias)


# diffusers' get_activation names.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "silu": _silu,
    "swish": _silu,
    "relu": nn.relu,
    "gelu": activations.gelu,  # torch nn.GELU(): exact erf form
    "mish": nn.mish,
}


def _activation(name: str) -> Callable[[mx.array], mx.array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


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
    """Nearest-neighbour upsampling by broadcasting (no transposed conv)."""
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


# ---------------------------------------------------------------- CPU convolutions
# MLX's CPU conv2d lowers a 3x3 conv to one GEMM over a 9x im2col buffer (1.2 GB at
# 512^2 x 128, page-faulted every call). The CPU path builds no im2col at all: in the
# zero-padded map flattened to rows of width W+2, the input of tap (dy, dx) for every
# output pixel is one contiguous window of the flat map, offset by dy*(W+2) + dx. So a
# 3x3 conv is nine GEMMs (K = C) on views, accumulated in place by addmm (bias first),
# computed on the padded width: the two extra columns per row are wrap-around garbage
# that the caller crops (for free, inside its next copy). Same products, summed in another
# order (float rounding only).


def _padded_rows(x: mx.array) -> mx.array:
    """[B,H,W,C] -> zero-padded [B, (H+3)*(W+2), C]: one pixel around, and a spare row at
    the bottom for the last windows' wrap-around."""
    batch, height, width, channels = x.shape
    padded = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)])
    return padded.reshape(batch, (height + 3) * (width + 2), channels)


def _taps_gemm(rows: mx.array, taps: Sequence[tuple[int, mx.array]], height: int, width: int,
               init: mx.array | None) -> mx.array:
    """init + sum over (offset, weight [O, C]) of rows[:, offset : offset + H*(W+2)] @ weight.T:
    [B, H*(W+2), O] on the padded width."""
    span = height * (width + 2)
    y = init
    for offset, weight in taps:
        window = rows[:, offset : offset + span]
        y = window @ weight.T if y is None else mx.addmm(y, window, weight.T)
    return y


def conv3x3_wide(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """3x3 conv, stride 1, padding 1, on the padded width: x [B,H,W,C], weight [O,3,3,C]
    (MLX layout), bias [O] -> [B, H, W+2, O] (contiguous); columns W, W+1 are garbage."""
    batch, height, width, channels = x.shape
    out = weight.shape[0]
    taps = mx.contiguous(weight.transpose(1, 2, 0, 3))  # [dy, dx, O, C], each tap row-contiguous
    offsets = [(dy * (width + 2) + dx, taps[dy, dx]) for dy in range(3) for dx in range(3)]
    y = _taps_gemm(_padded_rows(x), offsets, height, width, bias)
    return y.reshape(batch, height, width + 2, out)


def conv3x3_cpu(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """3x3 conv, stride 1, padding 1 (a cropped view of ``conv3x3_wide``)."""
    return conv3x3_wide(x, weight, bias)[:, :, : x.shape[2]]


def _conv3x3(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """A 3x3 / stride 1 / padding 1 ``nn.Conv2d``: the GEMM form on the CPU, MLX's conv elsewhere."""
    if activations.use_fast():
        return conv3x3_cpu(x, conv.weight, conv.get("bias"))
    return conv(x)


def _subpixel_weights(weight: mx.array) -> dict:
    """Nearest x2 then a 3x3 conv equals, at each output parity (a, b), a 2x2 conv of the
    low-resolution input whose taps sum the 3x3 taps that read the same input pixel:
    parity 0 reads rows/cols (-1, 0) with taps (w0, w1 + w2), parity 1 reads (0, +1) with
    (w0 + w1, w2). Returns {(a, b): [2 (dy), 2 (dx), O, C]}, contiguous (sums in float32)."""
    w = weight.astype(mx.float32)

    def pairs(t, axis):  # the two combined taps of parity 0 and 1 along ``axis``
        take = lambda i: mx.take(t, mx.array([i]), axis=axis)  # noqa: E731
        return {0: (take(0), take(1) + take(2)), 1: (take(0) + take(1), take(2))}

    out = {}
    for a, (r0, r1) in pairs(w, 1).items():
        rows = mx.concatenate([r0, r1], axis=1)  # [O, 2, 3, C]
        for b, (c0, c1) in pairs(rows, 2).items():
            wab = mx.concatenate([c0, c1], axis=2)  # [O, 2, 2, C]
            out[a, b] = mx.contiguous(wab.transpose(1, 2, 0, 3).astype(weight.dtype))  # [dy, dx, O, C]
    return out


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """diffusers RMSNorm with weight and bias (statistics in fp32)."""

    def __init__(self, dims: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) + self.bias

    def residual(self, y: mx.array, x: mx.array) -> mx.array:
        """``x + self(y)``, the bias and the residual added in one fused pass."""
        return _bias_residual(mx.fast.rms_norm(y, self.weight, self.eps), self.bias, x)


class DepthwiseConv2d(nn.Module):
    """``groups = channels`` conv, weight [C, k, k, 1]; runs through ``kernels.depthwise``."""

    def __init__(self, channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, kernel_size, 1))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return depthwise_conv2d(x, self.weight, self.get("bias"))


class GroupedPointwise(nn.Module):
    """Grouped 1x1 conv without bias, weight [C_out, C_in / groups] (equal group sizes).

    A batched matmul over the groups: MLX's grouped conv2d is several times slower."""

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

    def __init__(self, channels: int, act_fn: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNorm(channels)
        self.act = _activation(act_fn)

    def __call__(self, x: mx.array) -> mx.array:
        if activations.use_fast():
            width = x.shape[2]
            h = self.act(conv3x3_wide(x, self.conv1.weight, self.conv1.bias))[:, :, :width]
            return self.norm.residual(conv3x3_cpu(h, self.conv2.weight, None), x)
        return self.norm.residual(self.conv2(self.act(self.conv1(x))), x)


class MultiscaleProjection(nn.Module):
    """LiteMLA's aggregation branch: depthwise kxk, then a grouped 1x1 (one group per head of q, k, v)."""

    def __init__(self, channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.proj_in = DepthwiseConv2d(channels, kernel_size, bias=False)
        self.proj_out = GroupedPointwise(channels, groups)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj_out(self.proj_in(x))


def relu_quadratic_attention(q: mx.array, k: mx.array, v: mx.array, eps: float = ATTENTION_EPS) -> mx.array:
    """The same ReLU-kernel attention as ``relu_linear_attention``, evaluated through the
    [N, N] score matrix; diffusers takes this form when H*W <= head_dim.
    q, k, v: [B, heads, N, d]; scores in float32, result in v's dtype."""
    q = mx.maximum(q.astype(mx.float32), 0)
    k = mx.maximum(k.astype(mx.float32), 0)
    scores = q @ k.swapaxes(-1, -2)  # [B, heads, N_q, N_k]
    scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + eps)
    return scores.astype(v.dtype) @ v


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (diffusers ``SanaMultiscaleLinearAttention``), with
    the residual connection."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], norm_type: str):
        super().__init__()
        if norm_type != "rms_norm":
            raise ValueError(f"unsupported norm type {norm_type!r} (only 'rms_norm')")
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = [MultiscaleProjection(3 * inner, 3 * heads, k) for k in kernel_sizes]
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = RMSNorm(channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, _ = x.shape
        d = self.head_dim
        qkv = mx.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        branches = [qkv] + [branch(qkv) for branch in self.to_qkv_multiscale]
        qkv = mx.concatenate(branches, axis=-1) if len(branches) > 1 else qkv
        # Interleaved grouping: consecutive 3*d channels form one "head"; its
        # thirds are that head's q, k and v.
        qkv = qkv.reshape(b, h * w, -1, 3, d).transpose(3, 0, 2, 1, 4)  # [3, B, G, N, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if h * w > d:  # diffusers' condition for the linear (fp32) form
            out = relu_linear_attention(q, k, v, ATTENTION_EPS)
        else:
            out = relu_quadratic_attention(q, k, v, ATTENTION_EPS)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, -1)  # channel = group * d + i
        return self.norm_out.residual(self.to_out(out), x)


class GLUMBConv(nn.Module):
    """1x1 C->2E (+b) -> SiLU -> dw3x3 (+b) -> a * SiLU(gate) -> 1x1 E->C -> RMSNorm -> + x."""

    def __init__(self, channels: int, expand_ratio: float = 4):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.conv_inverted = nn.Linear(channels, 2 * hidden)
        self.conv_depth = DepthwiseConv2d(2 * hidden, 3, bias=True)
        self.conv_point = nn.Linear(hidden, channels, bias=False)
        self.norm = RMSNorm(channels)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_inverted(x)
        if activations.use_fast():  # two pieces, one per CPU stream (see gated_conv)
            gated = gated_depthwise_cpu(h, self.conv_depth.weight, self.conv_depth.bias)
        else:
            y, gate = mx.split(self.conv_depth(_silu(h)), 2, axis=-1)
            gated = _gated_silu(y, gate)
        return self.norm.residual(self.conv_point(gated), x)


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], norm_type: str):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv_out(self.attn(x))


class UpsampleBlock(nn.Module):
    """diffusers ``DCUpBlock2d`` with its shortcut: ``pixel_shuffle(repeat_interleave(x))``
    added to nearest x2 -> 3x3 conv (``interpolate``) or 3x3 conv -> pixel_shuffle."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool):
        super().__init__()
        self.interpolate = interpolate
        self.repeats = out_channels * 4 // in_channels
        conv_out = out_channels if interpolate else out_channels * 4
        self.conv = nn.Conv2d(in_channels, conv_out, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.interpolate and activations.use_fast():
            return self._subpixel(x)
        if self.interpolate:
            y = self.conv(upsample_nearest(x))
        else:
            y = pixel_shuffle(self.conv(x))
        return y + pixel_shuffle(repeat_channels(x, self.repeats))

    def _shortcut_channels(self, a: int, b: int, out: int) -> mx.array:
        """Input channels the shortcut reads at output parity (a, b):
        pixel_shuffle(repeat_interleave(x, r)) puts x[..., (4c + 2a + b) // r] at (a, b, c)."""
        return (4 * mx.arange(out) + 2 * a + b) // self.repeats

    def _shortcut(self, x: mx.array, a: int, b: int, out: int) -> mx.array:
        """x[..., _shortcut_channels(a, b, out)]: when r divides 4 the channels are
        (4 / r) c + (2a + b) // r, a strided slice (a view; a gather costs ~10 ms a band)."""
        r = self.repeats
        if 4 % r:
            return mx.take(x, self._shortcut_channels(a, b, out), axis=-1)
        step, first = 4 // r, (2 * a + b) // r
        return x[..., first : first + step * (out - 1) + 1 : step]

    def _subpixel(self, x: mx.array) -> mx.array:
        """CPU form of nearest x2 -> 3x3 conv (+ bias + shortcut): four 2x2 convs of the
        low-resolution input (2.25x fewer products than convolving the upsampled map), each
        four window GEMMs of the padded flat input (see ``conv3x3_wide``) starting from the
        bias + shortcut, then one copy that interleaves the parities and crops."""
        weight = self.conv.weight
        cached = getattr(self, "_subpixel_cache", None)
        if cached is None or cached[0] is not weight:
            cached = (weight, _subpixel_weights(weight))
            self._subpixel_cache = cached
        taps = cached[1]
        batch, height, width, channels = x.shape
        out = weight.shape[0]
        rows = _padded_rows(x)
        pitch = width + 2
        parts = []
        for a in (0, 1):
            for b in (0, 1):
                init = self._shortcut(x, a, b, out) + self.conv.bias
                init = mx.pad(init, [(0, 0), (0, 0), (0, 2), (0, 0)]).reshape(batch, height * pitch, out)
                # Parity 0 reads rows / columns (-1, 0) = padded offsets (0, 1); parity 1 (1, 2).
                offsets = [((a + dy) * pitch + (b + dx), taps[a, b][dy, dx]) for dy in (0, 1) for dx in (0, 1)]
                parts.append(_taps_gemm(rows, offsets, height, width, init).reshape(batch, height, pitch, out))
        y = mx.stack(parts, axis=1).reshape(batch, 2, 2, height, pitch, out)[:, :, :, :, :width]
        return y.transpose(0, 3, 1, 4, 2, 5).reshape(batch, 2 * height, 2 * width, out)


# ---------------------------------------------------------------- row bands
# The 512^2 ResBlocks' temporaries (padded map, conv outputs, activations: ~1 GB in
# float32) dominate the decoder's peak memory. Their output rows depend only on input
# rows within a small halo (two 3x3 convs: 2 rows; an upsampler or the output head: 1),
# so they can run band by band: each band reads its rows plus the halo, the halo's
# outputs are cropped, and the result is exact (the zero padding a band sees at its
# cut is only ever used by cropped rows). Bands are evaluated one at a time.

BAND_PIXELS = 1 << 15  # output pixels per band (64 rows of a 512-wide map)


def in_row_bands(fn: Callable[[mx.array], mx.array], x: mx.array, halo: int, scale: int = 1) -> mx.array:
    """``fn(x)`` for a row-local ``fn`` (output row r reads input rows within ``halo`` of
    r // ``scale``), computed in bands of about ``BAND_PIXELS`` output pixels."""
    batch, height, width = x.shape[:3]
    rows = max(1, BAND_PIXELS // (batch * width * scale * scale))
    if rows >= height:
        return fn(x)
    bands = []
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        lo, hi = max(0, start - halo), min(height, stop + halo)
        y = fn(x[:, lo:hi])[:, (start - lo) * scale : (stop - lo) * scale]
        mx.eval(y)
        bands.append(y)
    return mx.concatenate(bands, axis=1)


# ---------------------------------------------------------------- decoder


class DCAEDecoder(nn.Module):
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
                stage.append(UpsampleBlock(channels[i + 1], channels[i], interpolate))
            for _ in range(config.layers_per_block[i]):
                stage.append(self._block(config, i))
            self.up_blocks.append(stage)
        self.norm_out = RMSNorm(channels[0])
        self.conv_act = _activation(config.conv_act_fn)
        self.conv_out = nn.Conv2d(channels[0], config.image_channels, 3, padding=1)

    @staticmethod
    def _block(config: DCAEDecoderConfig, stage: int) -> nn.Module:
        block_type = config.block_types[stage]
        channels = config.block_out_channels[stage]
        if block_type == "ResBlock":
            if config.norm_types[stage] != "rms_norm":
                raise ValueError(f"unsupported norm type {config.norm_types[stage]!r} (only 'rms_norm')")
            return ResBlock(channels, config.act_fns[stage])
        if block_type == "EfficientViTBlock":
            return EfficientViTBlock(
                channels, config.attention_head_dim, config.qkv_multiscales[stage], config.norm_types[stage]
            )
        raise ValueError(f"unsupported decoder block type {block_type!r}")

    def __call__(self, latents: mx.array) -> mx.array:
        x = _conv3x3(self.conv_in, latents)
        if self.config.in_shortcut:
            x = x + repeat_channels(latents, x.shape[-1] // latents.shape[-1])
        for stage in reversed(self.up_blocks):
            for layer in stage:
                # ResBlocks and upsamplers only look at neighbouring pixels: at high
                # resolution they run in row bands (exact), which bounds their temporaries.
                if isinstance(layer, ResBlock):
                    x = in_row_bands(layer, x, halo=2)
                elif isinstance(layer, UpsampleBlock):
                    x = in_row_bands(layer, x, halo=1, scale=2)
                else:
                    x = layer(x)
        return in_row_bands(self._head, x, halo=1)

    def _head(self, x: mx.array) -> mx.array:
        return _conv3x3(self.conv_out, self.conv_act(self.norm_out(x)))

    def decode_tiled(self, latents: mx.array, tile: int = 16, overlap: int = 4) -> mx.array:
        """Decode overlapping ``tile`` x ``tile`` latent tiles (``overlap`` latents shared by
        neighbours) and blend them; equals ``self(latents)`` when one tile covers all."""
        return decode_tiled(self, latents, tile=tile, overlap=overlap, scale=SPATIAL_SCALE)


# ---------------------------------------------------------------- tiling


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) latent spans of ``tile`` length covering ``size``, ``tile - overlap``
    apart; the last span is pulled back to end at the border, so every tile is full."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _blend_weights(spans: list[tuple[int, int]], scale: int) -> list[np.ndarray]:
    """Per-span 1-D pixel weights: linear ramps across each overlap with a neighbour,
    normalized so that the weights of all spans sum to 1 at every pixel."""
    weights = []
    for index, (start, end) in enumerate(spans):
        length = (end - start) * scale
        weight = np.ones(length, dtype=np.float64)
        if index > 0:  # ramp up over the overlap with the previous tile
            lead = (spans[index - 1][1] - start) * scale
            weight[:lead] = np.minimum(weight[:lead], (np.arange(lead) + 0.5) / lead)
        if index < len(spans) - 1:  # ramp down over the overlap with the next tile
            trail = (end - spans[index + 1][0]) * scale
            ramp = (np.arange(trail)[::-1] + 0.5) / trail
            weight[length - trail :] = np.minimum(weight[length - trail :], ramp)
        weights.append(weight)
    total = np.zeros(spans[-1][1] * scale)
    for (start, _), weight in zip(spans, weights):
        total[start * scale : start * scale + len(weight)] += weight
    return [w / total[s * scale : s * scale + len(w)] for (s, _), w in zip(spans, weights)]


def decode_tiled(
    decode: Callable[[mx.array], mx.array],
    latents: mx.array,
    tile: int = 16,
    overlap: int = 4,
    scale: int = SPATIAL_SCALE,
) -> mx.array:
    """Seamless tiled decoding: ``decode`` (latents [B,h,w,C] -> images [B,scale*h,scale*w,c])
    runs on overlapping latent tiles, one at a time (evaluated, to bound memory), and the
    tiles are blended with linear ramps in the overlaps (weights summing to one).

    Tiles see less context than the whole image (attention is global in a tile), so the
    result approximates ``decode(latents)``; it is ``decode(latents)`` when one tile fits."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    batch, height, width, _ = latents.shape
    rows, cols = _tile_spans(height, tile, overlap), _tile_spans(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(latents)

    row_weights, col_weights = _blend_weights(rows, scale), _blend_weights(cols, scale)
    image = None
    for (top, bottom), row_weight in zip(rows, row_weights):
        for (left, right), col_weight in zip(cols, col_weights):
            piece = decode(latents[:, top:bottom, left:right, :]).astype(mx.float32)
            if image is None:
                image = mx.zeros((batch, height * scale, width * scale, piece.shape[-1]), mx.float32)
            weight = mx.array((row_weight[:, None] * col_weight[None, :])[None, :, :, None], mx.float32)
            y0, x0 = top * scale, left * scale
            y1, x1 = y0 + piece.shape[1], x0 + piece.shape[2]
            image[:, y0:y1, x0:x1, :] = image[:, y0:y1, x0:x1, :] + piece * weight
            mx.eval(image)
    return image.astype(latents.dtype)
