"""SANA DiT (diffusers ``SanaTransformer2DModel`` semantics), latents in NHWC.

One forward pass predicts the flow velocity of ``latents`` at ``timestep``
conditioned on caption tokens (SPEC.md §2.5):

    patch embed -> N x [AdaLN-modulated ReLU linear self-attention,
                        softmax cross-attention on the raw stream,
                        AdaLN-modulated GLUMBConv Mix-FFN]
                -> AdaLN-modulated final norm -> projection -> unpatchify

Speed: during one generation the caption tokens never change and the timestep
is shared by the CFG pair, so the conditioning can be hoisted out of the
denoising loop:

    text = dit.encode_text(encoder_hidden_states, encoder_attention_mask)  # once
    for t in timesteps:
        time = dit.embed_timestep(t)                                       # per step
        velocity = dit(latents, time=time, text=text)

``dit(latents, timestep, encoder_hidden_states, mask)`` does the same in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mobileo_mlx.kernels.depthwise import depthwise_conv2d
from mobileo_mlx.kernels.linear_attention import relu_linear_attention

from . import activations
from .gated_conv import gated_depthwise_cpu

TIMESTEP_CHANNELS = 256  # sinusoid width of the AdaLN-single timestep embedding
LINEAR_ATTENTION_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0
CAPTION_NORM_EPS = 1e-5
OUTPUT_NORM_EPS = 1e-6  # diffusers hard-codes this one (not config.norm_eps)
MASKED_KEY_BIAS = -10000.0  # diffusers turns a 0/1 key mask into this additive bias


@dataclass
class SanaConfig:
    """diffusers' transformer ``config.json`` fields (defaults: SANA-600M 512px)."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 36
    attention_head_dim: int = 32
    num_layers: int = 28
    num_cross_attention_heads: int = 16
    cross_attention_head_dim: int = 72
    cross_attention_dim: int = 1152
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    attention_bias: bool = False
    sample_size: int = 16
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    # Options of SanaTransformer2DModel this runtime does not implement; kept
    # so that a config using them is rejected instead of silently ignored.
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        if self.out_channels is None:  # diffusers: out_channels or in_channels
            self.out_channels = self.in_channels
        if self.interpolation_scale is not None:
            raise ValueError("SANA with a sin-cos positional embedding (interpolation_scale set) is not supported")
        if self.guidance_embeds:
            raise ValueError("SANA with guidance embeddings (guidance_embeds=True) is not supported")
        if self.qk_norm is not None:
            raise ValueError(f"SANA with qk_norm={self.qk_norm!r} is not supported")
        if self.cross_attention_dim != self.inner_dim:
            # The caption is projected to inner_dim before the cross-attention K/V projections.
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim} must equal "
                f"num_attention_heads*attention_head_dim={self.inner_dim}"
            )

    @classmethod
    def from_dict(cls, config: dict) -> "SanaConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)


class TextConditioning(NamedTuple):
    """Everything that depends only on the caption (see ``SanaTransformer.encode_text``)."""

    cross_kv: tuple[tuple[mx.array, mx.array], ...]  # per block: K, V [B, heads, L, head_dim]
    key_bias: mx.array | None  # additive key mask [B, 1, 1, L], or None


class TimeConditioning(NamedTuple):
    """AdaLN-single outputs for one timestep (see ``SanaTransformer.embed_timestep``)."""

    modulation: mx.array  # [B, 6, D]: every block's shift/scale/gate, before its own table
    embedding: mx.array  # [B, D]: modulates the output norm


@mx.compile
def _modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


@mx.compile
def _gated_residual(x: mx.array, gate: mx.array, update: mx.array) -> mx.array:
    return x + gate * update


@mx.compile
def _glu(values: mx.array, gate: mx.array) -> mx.array:
    return values * nn.silu(gate)


def _layer_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps)


def timestep_sinusoid(timestep: mx.array, channels: int = TIMESTEP_CHANNELS) -> mx.array:
    """[B] -> [B, channels] float32, order [cos | sin], frequencies exp(-ln(1e4) i / (channels/2))."""
    half = channels // 2
    # Frequencies in float32 exactly as diffusers computes them: the arguments
    # reach ~1000, so a one-ulp difference here would show in the output.
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = mx.array(np.exp(exponent))
    angles = timestep.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


class TimestepEmbedder(nn.Module):
    """AdaLN-single: sinusoid -> MLP -> ``embedding``; SiLU -> Linear -> 6 modulation vectors."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def __call__(self, timestep: mx.array, dtype: mx.Dtype) -> TimeConditioning:
        # Tiny ([B, D]); MLX's built-in SiLU keeps the half-precision rounding of the
        # conditioning that test_sana's float16 check was tuned on.
        embedding = self.linear_2(nn.silu(self.linear_1(timestep_sinusoid(timestep).astype(dtype))))
        modulation = self.modulation(nn.silu(embedding))
        return TimeConditioning(modulation.reshape(modulation.shape[0], 6, -1), embedding)


class CaptionProjection(nn.Module):
    def __init__(self, caption_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(caption_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, caption: mx.array) -> mx.array:
        return self.linear_2(nn.gelu_approx(self.linear_1(caption)))  # GELU, tanh form (once per prompt)


def _split_heads(x: mx.array, heads: int) -> mx.array:
    """[B, N, heads*d] -> [B, heads, N, d] (head h owns channels h*d .. h*d+d-1)."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, heads, -1).transpose(0, 2, 1, 3)


def _merge_heads(x: mx.array) -> mx.array:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


class LinearSelfAttention(nn.Module):
    """ReLU linear attention (fp32, no 1/sqrt(d) scaling) over the image tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_merge_heads(relu_linear_attention(q, k, v, eps=LINEAR_ATTENTION_EPS)))


class CrossAttention(nn.Module):
    """Softmax attention from the image tokens to the caption tokens (all projections biased)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.scale = head_dim**-0.5
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(context_dim, inner)
        self.v_proj = nn.Linear(context_dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """K, V [B, heads, L, head_dim] of the projected caption (hoistable)."""
        return _split_heads(self.k_proj(context), self.heads), _split_heads(self.v_proj(context), self.heads)

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, key_bias: mx.array | None) -> mx.array:
        q = _split_heads(self.q_proj(x), self.heads)
        out = activations.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=key_bias)
        return self.out_proj(_merge_heads(out))


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 conv with bias; weight [C, 3, 3, 1] (MLX layout)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, kernel_size, 1))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return depthwise_conv2d(x, self.weight, self.bias)


class GLUMBConv(nn.Module):
    """Mix-FFN: 1x1 expand to 2H (+b) -> SiLU -> depthwise 3x3 (+b) -> a*SiLU(g) -> 1x1 to D (no bias).
    The 1x1 convs are Linears over the channel axis (quantizable).

    On the CPU the element-wise middle runs as ``gated_conv.gated_depthwise_cpu`` (two
    pieces, one per CPU stream); the GPU path (the plain twin) convolves all channels and
    splits after."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv_inverted = nn.Linear(dim, 2 * hidden)
        self.conv_depth = DepthwiseConv(2 * hidden)
        self.conv_point = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array, height: int, width: int) -> mx.array:
        batch, tokens, _ = x.shape
        h = self.conv_inverted(x).reshape(batch, height, width, -1)
        if activations.use_fast():
            gated = gated_depthwise_cpu(h, self.conv_depth.weight, self.conv_depth.bias)
        else:
            values, gate = mx.split(self.conv_depth(activations.silu(h)), 2, axis=-1)
            gated = _glu(values, gate)
        return self.conv_point(gated.reshape(batch, tokens, -1))


class SanaBlock(nn.Module):
    def __init__(self, config: SanaConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm_eps = config.norm_eps
        self.self_attn = LinearSelfAttention(
            dim, config.num_attention_heads, config.attention_head_dim, config.attention_bias
        )
        self.cross_attn = CrossAttention(
            dim, config.cross_attention_dim, config.num_cross_attention_heads, config.cross_attention_head_dim
        )
        # Only the FFN's norm can carry affine parameters (diffusers' norm2).
        self.ffn_norm = nn.LayerNorm(dim, eps=config.norm_eps, affine=config.norm_elementwise_affine)
        self.ff = GLUMBConv(dim, config.ffn_hidden_dim)
        self.scale_shift_table = mx.zeros((6, dim))

    def __call__(
        self,
        x: mx.array,
        height: int,
        width: int,
        modulation: mx.array,
        keys: mx.array,
        values: mx.array,
        key_bias: mx.array | None,
    ) -> mx.array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mx.split(
            self.scale_shift_table + modulation, 6, axis=1
        )  # each [B, 1, D]
        h = _modulate(_layer_norm(x, self.norm_eps), shift_msa, scale_msa)
        x = _gated_residual(x, gate_msa, self.self_attn(h))
        # The cross-attention query is the raw stream: no norm, no modulation, no gate.
        x = x + self.cross_attn(x, keys, values, key_bias)
        h = _modulate(self.ffn_norm(x), shift_mlp, scale_mlp)
        return _gated_residual(x, gate_mlp, self.ff(h, height, width))


class SanaTransformer(nn.Module):
    def __init__(self, config: SanaConfig):
        super().__init__()
        self.config = config
        dim, patch = config.inner_dim, config.patch_size
        # The p x p stride-p patch conv as a Linear over each flattened (p, p, C_in) patch.
        self.patch_embed = nn.Linear(patch * patch * config.in_channels, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.caption_projection = CaptionProjection(config.caption_channels, dim)
        self.caption_norm = nn.RMSNorm(dim, eps=CAPTION_NORM_EPS)
        self.blocks = [SanaBlock(config) for _ in range(config.num_layers)]
        self.scale_shift_table = mx.zeros((2, dim))
        self.proj_out = nn.Linear(dim, patch * patch * config.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the (never quantized) modulation table."""
        return self.scale_shift_table.dtype

    def encode_text(
        self, encoder_hidden_states: mx.array, encoder_attention_mask: mx.array | None = None
    ) -> TextConditioning:
        """Caption projection + RMSNorm and every block's cross-attention K/V.

        encoder_hidden_states [B, L, caption_channels]; encoder_attention_mask [B, L]
        (1 keep, 0 drop) or None. Compute once per generation, reuse every step.
        """
        context = self.caption_norm(self.caption_projection(encoder_hidden_states.astype(self.dtype)))
        key_bias = None
        if encoder_attention_mask is not None:
            # diffusers: (1 - mask) * -10000 added to the scores of every head and query.
            key_bias = (1 - encoder_attention_mask.astype(self.dtype)) * MASKED_KEY_BIAS
            key_bias = key_bias[:, None, None, :]
        return TextConditioning(tuple(block.cross_attn.keys_values(context) for block in self.blocks), key_bias)

    def embed_timestep(self, timestep: mx.array | int | float) -> TimeConditioning:
        """AdaLN-single embedding of a [B] (or scalar, shared by the batch) timestep."""
        timestep = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        return self.time_embed(timestep.reshape(-1), self.dtype)

    def _patchify(self, latents: mx.array) -> mx.array:
        batch, height, width, channels = latents.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of patch_size {p}")
        if p == 1:
            return latents.reshape(batch, height * width, channels)
        x = latents.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, (height // p) * (width // p), p * p * channels)

    def _unpatchify(self, x: mx.array, height: int, width: int) -> mx.array:
        batch, p = x.shape[0], self.config.patch_size
        x = x.reshape(batch, height, width, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, height * p, width * p, -1)

    def __call__(
        self,
        latents: mx.array,
        timestep: mx.array | int | float | None = None,
        encoder_hidden_states: mx.array | None = None,
        encoder_attention_mask: mx.array | None = None,
        *,
        time: TimeConditioning | None = None,
        text: TextConditioning | None = None,
    ) -> mx.array:
        """latents [B, h, w, in_channels] -> velocity [B, h, w, out_channels] (NHWC).

        Give either ``timestep`` ([B] or scalar; integer-valued) or its precomputed
        ``time = embed_timestep(timestep)``, and either ``encoder_hidden_states``
        (+ optional ``encoder_attention_mask``) or ``text = encode_text(...)``.
        Inputs are cast to the model's dtype; the output has that dtype.
        """
        if (timestep is None) == (time is None):
            raise ValueError("pass exactly one of timestep and time")
        if (encoder_hidden_states is None) == (text is None):
            raise ValueError("pass exactly one of encoder_hidden_states and text")
        if text is None:
            text = self.encode_text(encoder_hidden_states, encoder_attention_mask)
        elif encoder_attention_mask is not None:
            raise ValueError("the mask of precomputed text conditioning is given to encode_text")
        if time is None:
            time = self.embed_timestep(timestep)

        batch, height, width, _ = latents.shape
        p = self.config.patch_size
        x = self.patch_embed(self._patchify(latents.astype(self.dtype)))
        for block, (keys, values) in zip(self.blocks, text.cross_kv):
            x = block(x, height // p, width // p, time.modulation, keys, values, text.key_bias)

        shift, scale = mx.split(self.scale_shift_table + time.embedding[:, None, :], 2, axis=1)
        x = self.proj_out(_modulate(_layer_norm(x, OUTPUT_NORM_EPS), shift, scale))
        return self._unpatchify(x, height // p, width // p)
