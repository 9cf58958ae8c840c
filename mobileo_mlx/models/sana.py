"""SANA DiT: diffusers' ``SanaTransformer2DModel``, latents in NHWC.

Module structure and parameter paths are diffusers' (``transformer_blocks.N.attn1.to_q``,
``attn2``, ``norm2``, ``ff.conv_inverted``, ``time_embed.emb.timestep_embedder.linear_1``,
...), so a fix in diffusers' sana_transformer.py has its place here. Layout differs where
MLX wants it: the 1x1 convs are Linears over channels (weight [O, I]), the patch conv a
Linear over flattened (p, p, C) patches, the depthwise conv OHWI.

One forward pass predicts the flow velocity of ``latents`` at ``timestep`` conditioned on
caption tokens (docs/reference-model.md §2.5):

    patch embed -> N x [AdaLN-modulated ReLU linear self-attention,
                        softmax cross-attention on the raw stream,
                        AdaLN-modulated GLUMBConv Mix-FFN]
                -> AdaLN-modulated final norm -> projection -> unpatchify

During one generation the caption tokens never change and the timestep is shared by the
CFG pair, so the conditioning can be hoisted out of the denoising loop:

    text = dit.encode_text(encoder_hidden_states, encoder_attention_mask)  # once
    for t in timesteps:
        time = dit.embed_timestep(t)                                       # per step
        velocity = dit(latents, time=time, text=text)

``dit(latents, timestep, encoder_hidden_states, mask)`` does the same in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .common import BaseModelArgs, DepthwiseConv, RMSNorm, ReLULinearAttention, ScaledDotProductAttention

TIMESTEP_CHANNELS = 256  # sinusoid width of the AdaLN-single timestep embedding
LINEAR_ATTENTION_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0
CAPTION_NORM_EPS = 1e-5
OUTPUT_NORM_EPS = 1e-6  # diffusers hard-codes this one (not config.norm_eps)
MASKED_KEY_BIAS = -10000.0  # diffusers turns a 0/1 key mask into this additive bias


@dataclass
class SanaConfig(BaseModelArgs):
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


def timestep_sinusoid(timestep: mx.array, channels: int = TIMESTEP_CHANNELS) -> mx.array:
    """diffusers' ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)``:
    [B] -> [B, channels] float32, order [cos | sin], frequencies exp(-ln(1e4) i / (channels/2))."""
    half = channels // 2
    # Frequencies in float32 exactly as diffusers computes them: the arguments
    # reach ~1000, so a one-ulp difference here would show in the output.
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = mx.array(np.exp(exponent))
    angles = timestep.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, sample: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(sample)))


class PixArtAlphaCombinedTimestepSizeEmbeddings(nn.Module):
    """The timestep part only (SANA uses no additional size conditions)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, embedding_dim)

    def __call__(self, timestep: mx.array, dtype: mx.Dtype) -> mx.array:
        return self.timestep_embedder(timestep_sinusoid(timestep).astype(dtype))


class AdaLayerNormSingle(nn.Module):
    """AdaLN-single: ``embedded = emb(timestep)``; 6 modulation vectors = linear(silu(embedded))."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(embedding_dim)
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)

    def __call__(self, timestep: mx.array, dtype: mx.Dtype) -> TimeConditioning:
        embedded = self.emb(timestep, dtype)
        modulation = self.linear(nn.silu(embedded))
        return TimeConditioning(modulation.reshape(modulation.shape[0], 6, -1), embedded)


class PixArtAlphaTextProjection(nn.Module):
    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def __call__(self, caption: mx.array) -> mx.array:
        return self.linear_2(nn.gelu_approx(self.linear_1(caption)))  # act_1: GELU, tanh form


class PatchEmbed(nn.Module):
    """The p x p stride-p patch conv ``proj``, as a Linear over each flattened (p, p, C) patch
    (no positional embedding: interpolation_scale is None)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_channels, embed_dim)

    def __call__(self, latents: mx.array) -> mx.array:
        """[B, H, W, C] -> [B, (H/p)(W/p), D]."""
        batch, height, width, channels = latents.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of patch_size {p}")
        if p == 1:
            return self.proj(latents.reshape(batch, height * width, channels))
        x = latents.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(batch, (height // p) * (width // p), p * p * channels))


def _split_heads(x: mx.array, heads: int) -> mx.array:
    """[B, N, heads*d] -> [B, heads, N, d] (head h owns channels h*d .. h*d+d-1)."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, heads, -1).transpose(0, 2, 1, 3)


def _merge_heads(x: mx.array) -> mx.array:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


class SanaLinearAttention(nn.Module):
    """``attn1``: diffusers' ``Attention`` with ``SanaLinearAttnProcessor2_0``: ReLU linear
    attention (float32, no 1/sqrt(d) scaling) over the image tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, dim)]
        self.attention = ReLULinearAttention(LINEAR_ATTENTION_EPS)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](_merge_heads(self.attention(q, k, v)))


class SanaCrossAttention(nn.Module):
    """``attn2``: diffusers' ``Attention`` with ``SanaAttnProcessor2_0``: softmax attention from
    the image tokens to the caption tokens (all projections biased)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.scale = head_dim**-0.5
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_out = [nn.Linear(inner, dim)]
        self.attention = ScaledDotProductAttention()

    def keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """K, V [B, heads, L, head_dim] of the projected caption (hoistable)."""
        return _split_heads(self.to_k(context), self.heads), _split_heads(self.to_v(context), self.heads)

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, key_bias: mx.array | None) -> mx.array:
        q = _split_heads(self.to_q(x), self.heads)
        return self.to_out[0](_merge_heads(self.attention(q, keys, values, self.scale, key_bias)))


class GLUMBConv(nn.Module):
    """diffusers' ``GLUMBConv`` (SANA's Mix-FFN, and the DC-AE's, with ``norm_type="rms_norm"``
    and the residual connection): 1x1 expand to 2H (+b) -> SiLU -> depthwise 3x3 (+b) ->
    a * SiLU(g) -> 1x1 to C_out (no bias) [-> RMSNorm] [+ x]. NHWC; the 1x1 convs are
    Linears over the channel axis."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 4,
                 norm_type: str | None = None, residual_connection: bool = True):
        super().__init__()
        hidden_channels = int(expand_ratio * in_channels)
        self.residual_connection = residual_connection
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Linear(in_channels, hidden_channels * 2)
        self.conv_depth = DepthwiseConv(hidden_channels * 2, hidden_channels * 2, 3)
        self.conv_point = nn.Linear(hidden_channels, out_channels, bias=False)
        if norm_type not in (None, "rms_norm"):
            raise ValueError(f"unsupported norm type {norm_type!r} (only 'rms_norm')")
        self.norm = RMSNorm(out_channels) if norm_type == "rms_norm" else None

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_depth(self.nonlinearity(self.conv_inverted(x)))
        h, gate = mx.split(h, 2, axis=-1)
        h = self.conv_point(h * self.nonlinearity(gate))
        if self.norm is not None:
            h = self.norm(h)
        return h + x if self.residual_connection else h


class SanaTransformerBlock(nn.Module):
    def __init__(self, config: SanaConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps, affine=False)
        self.attn1 = SanaLinearAttention(dim, config.num_attention_heads, config.attention_head_dim,
                                         config.attention_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps, affine=config.norm_elementwise_affine)
        self.attn2 = SanaCrossAttention(dim, config.cross_attention_dim, config.num_cross_attention_heads,
                                        config.cross_attention_head_dim)
        self.ff = GLUMBConv(dim, dim, config.mlp_ratio, norm_type=None, residual_connection=False)
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
        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        x = _gated_residual(x, gate_msa, self.attn1(h))
        # The cross-attention query is the raw stream: no norm, no modulation, no gate.
        x = x + self.attn2(x, keys, values, key_bias)
        h = _modulate(self.norm2(x), shift_mlp, scale_mlp)
        batch, tokens, dim = h.shape
        ff = self.ff(h.reshape(batch, height, width, dim)).reshape(batch, tokens, dim)
        return _gated_residual(x, gate_mlp, ff)


class SanaModulatedNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, affine=False)

    def __call__(self, x: mx.array, embedding: mx.array, scale_shift_table: mx.array) -> mx.array:
        shift, scale = mx.split(scale_shift_table + embedding[:, None, :], 2, axis=1)
        return _modulate(self.norm(x), shift, scale)


class SanaTransformer(nn.Module):
    """diffusers' ``SanaTransformer2DModel``."""

    def __init__(self, config: SanaConfig):
        super().__init__()
        self.config = config
        dim, patch = config.inner_dim, config.patch_size
        self.patch_embed = PatchEmbed(patch, config.in_channels, dim)
        self.time_embed = AdaLayerNormSingle(dim)
        self.caption_projection = PixArtAlphaTextProjection(config.caption_channels, dim)
        self.caption_norm = nn.RMSNorm(dim, eps=CAPTION_NORM_EPS)
        self.transformer_blocks = [SanaTransformerBlock(config) for _ in range(config.num_layers)]
        self.scale_shift_table = mx.zeros((2, dim))
        self.norm_out = SanaModulatedNorm(dim, eps=OUTPUT_NORM_EPS)
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
        return TextConditioning(tuple(block.attn2.keys_values(context) for block in self.transformer_blocks),
                                key_bias)

    def embed_timestep(self, timestep: mx.array | int | float) -> TimeConditioning:
        """AdaLN-single embedding of a [B] (or scalar, shared by the batch) timestep."""
        timestep = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        return self.time_embed(timestep.reshape(-1), self.dtype)

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

        _, height, width, _ = latents.shape
        p = self.config.patch_size
        x = self.patch_embed(latents.astype(self.dtype))
        for block, (keys, values) in zip(self.transformer_blocks, text.cross_kv):
            x = block(x, height // p, width // p, time.modulation, keys, values, text.key_bias)
        x = self.proj_out(self.norm_out(x, time.embedding, self.scale_shift_table))
        return self._unpatchify(x, height // p, width // p)
