"""Random Mobile-O checkpoints in the released layout: the converter's fixture (``--model demo``,
tests, benchmarks).

``write_checkpoint(folder)`` writes what ``Amshaker/Mobile-O-0.5B`` ships (docs/reference-model.md
§1.1), filled with seeded random values instead of trained ones:

* ``model.safetensors``: every tensor of the released file under its real name (Qwen2 with
  ``lm_head``, FastViTHD in fused form with its unfused ConvFFN BatchNorms, ``num_batches_tracked``
  and the unused ``head.proj``, the projector, the MCP with ``layer_weights`` and the 0-d
  ``temperature``, the SANA DiT and the full DC-AE encoder and decoder), bfloat16 with int64
  ``num_batches_tracked``, written by the converter's own :class:`SafetensorsWriter` and bf16
  encoder under the prefixes its mapping modules read;
* ``config.json`` with every field of the released one, sizes and token ids adjusted;
* the slow Qwen2 tokenizer files of a tiny byte-level BPE (:mod:`mobileo_mlx.convert.demo_tokenizer`);
* the diffusers configs the original code downloads at load time (``transformer/config.json``,
  ``vae/config.json``, ``scheduler/scheduler_config.json``): :mod:`mobileo_mlx.convert.defaults`
  with the sizes of the checkpoint.

Every size comes from one :class:`Dims`: ``dims="demo"`` shrinks every size but keeps every
structure (a few MB, 128x128 images); ``dims="full"`` has the real sizes (a 3.3 GB file, streamed
a chunk at a time). Outputs of a random model are noise; the weights are scaled so that a forward
pass stays finite.

No torch: numpy, the converter's own modules and ``tokenizers`` (for the vocabulary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mobileo_mlx.convert.checkpoint import CHUNK_ELEMENTS, PlannedTensor, SafetensorsWriter
from mobileo_mlx.convert.defaults import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG
from mobileo_mlx.convert.demo_tokenizer import token_ids, tokenizer_files, tokenizer_size
from mobileo_mlx.convert.layout import DEFAULT_DIFFUSION_REPO
from mobileo_mlx.convert.mapping import dcae, fastvit, mcp, sana
from mobileo_mlx.models.sana import TIMESTEP_CHANNELS

# Bump whenever the written bytes change, so cached demo checkpoints are rewritten.
WRITER_VERSION = 1

# Where the released file keeps each part: the prefixes the converter's mappings read.
VISION_PREFIX = fastvit.PREFIX
MCP_PREFIX = mcp.PREFIX
DIT_PREFIX = sana.PREFIX
VAE_PREFIX = dcae.PREFIX.removesuffix("decoder.")  # the whole autoencoder; only its decoder is converted

FASTVIT_HEAD_DIM = 32  # attention stages: heads = width / 32
VISION_DOWNSAMPLING = 64  # stem /4, four downsamplers /16


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Dims:
    """Every size a Mobile-O checkpoint's tensors depend on."""

    # FastViTHD: five stages (RepMixer x3, RepCPE + attention x2), then conv_exp to 2 * widths[-1].
    image_size: int
    vision_layers: tuple[int, ...]
    vision_widths: tuple[int, ...]
    vision_mlp_ratio: int
    vision_proj_dim: int  # the unused head.proj [2 * widths[-1], proj_dim]
    # Qwen2 (GQA, untied lm_head); vocab_size None = the tokenizer's size.
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int | None
    # Mobile Conditioning Projector: fuses the last `mcp_layers` hidden states.
    mcp_layers: int
    mcp_width: int
    mcp_refiners: int
    mcp_reduction: int
    caption_channels: int
    # SANA DiT (self-attention width = heads * head_dim = cross-attention width).
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    dit_cross_heads: int
    dit_cross_head_dim: int
    dit_mlp_ratio: float
    latent_size: int
    latent_channels: int
    # DC-AE (one entry per stage, shallow to deep).
    vae_widths: tuple[int, ...]
    vae_encoder_layers: tuple[int, ...]
    vae_decoder_layers: tuple[int, ...]
    vae_block_types: tuple[str, ...]
    vae_multiscales: tuple[tuple[int, ...], ...]
    vae_head_dim: int

    def __post_init__(self) -> None:
        widths = self.vision_widths
        problems = []
        if len(widths) != 5 or len(self.vision_layers) != 5:
            problems.append("FastViTHD has five stages")
        if any(b % a for a, b in zip(widths, widths[1:])):
            problems.append("FastViT downsamplers are grouped by input width: widths must divide")
        if any(w % FASTVIT_HEAD_DIM for w in widths[3:]):
            problems.append(f"FastViT attention widths must be multiples of {FASTVIT_HEAD_DIM}")
        if self.image_size % VISION_DOWNSAMPLING:
            problems.append(f"image_size must be a multiple of {VISION_DOWNSAMPLING}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            problems.append("Qwen2 heads must divide hidden_size and be a multiple of the KV heads")
        if self.mcp_width % self.mcp_reduction:
            problems.append("mcp_reduction must divide mcp_width")
        if self.dit_cross_heads * self.dit_cross_head_dim != self.dit_width:
            problems.append("SANA cross-attention width must equal the self-attention width")
        vae = (self.vae_widths, self.vae_encoder_layers, self.vae_decoder_layers)
        if len({len(x) for x in (*vae, self.vae_block_types, self.vae_multiscales)}) != 1:
            problems.append("DC-AE per-stage tuples must have the same length")
        if any((4 * a) % b or (4 * b) % a for a, b in zip(self.vae_widths, self.vae_widths[1:])):
            problems.append("DC-AE shortcuts need integer repeat/group factors between stages")
        if self.vae_widths[-1] % self.latent_channels:
            problems.append("DC-AE in/out shortcuts need latent_channels to divide the last width")
        if any(
            kind == "EfficientViTBlock" and width % self.vae_head_dim
            for kind, width in zip(self.vae_block_types, self.vae_widths)
        ):
            problems.append("DC-AE EfficientViT widths must be multiples of vae_head_dim")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mm_hidden_size(self) -> int:
        """Width of the vision features (conv_exp output), the projector's input."""
        return 2 * self.vision_widths[-1]

    @property
    def vision_se_width(self) -> int:
        return self.mm_hidden_size // 16

    @property
    def vision_tower(self) -> str:
        return f"mobileclip_l_{self.image_size}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dit_width(self) -> int:
        return self.dit_heads * self.dit_head_dim

    @property
    def dit_ffn_width(self) -> int:
        return int(self.dit_width * self.dit_mlp_ratio)

    @property
    def native_image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae_widths) - 1)


_VAE_TYPES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_VAE_SCALES = ((), (), (), (5,), (5,), (5,))

FULL = Dims(
    image_size=1024,
    vision_layers=(2, 12, 24, 4, 2),
    vision_widths=(96, 192, 384, 768, 1536),
    vision_mlp_ratio=4,
    vision_proj_dim=768,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    vocab_size=151649,
    mcp_layers=4,
    mcp_width=512,
    mcp_refiners=2,
    mcp_reduction=4,
    caption_channels=2304,
    dit_layers=28,
    dit_heads=36,
    dit_head_dim=32,
    dit_cross_heads=16,
    dit_cross_head_dim=72,
    dit_mlp_ratio=2.5,
    latent_size=16,
    latent_channels=32,
    vae_widths=(128, 256, 512, 512, 1024, 1024),
    vae_encoder_layers=(2, 2, 2, 3, 3, 3),
    vae_decoder_layers=(3, 3, 3, 3, 3, 3),
    vae_block_types=_VAE_TYPES,
    vae_multiscales=_VAE_SCALES,
    vae_head_dim=32,
)

DEMO = Dims(
    image_size=256,  # 16 image tokens
    vision_layers=(1, 1, 2, 1, 1),
    vision_widths=(8, 16, 32, 64, 128),  # attention stages: 2 and 4 heads of 32
    vision_mlp_ratio=4,
    vision_proj_dim=32,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=None,
    mcp_layers=4,
    mcp_width=32,
    mcp_refiners=2,
    mcp_reduction=4,
    caption_channels=96,
    dit_layers=2,
    dit_heads=2,
    dit_head_dim=32,
    dit_cross_heads=2,
    dit_cross_head_dim=32,
    dit_mlp_ratio=2.5,
    latent_size=4,  # 128x128 images
    latent_channels=8,
    vae_widths=(8, 16, 32, 32, 64, 64),
    vae_encoder_layers=(1, 1, 1, 2, 2, 2),
    vae_decoder_layers=(2, 2, 2, 2, 2, 2),
    vae_block_types=_VAE_TYPES,
    vae_multiscales=_VAE_SCALES,
    vae_head_dim=32,
)

PRESETS = {"demo": DEMO, "full": FULL}


# --------------------------------------------------------------------------------------------
# Tensor lists, one function per component, mirroring the modules


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor and how to fill it.

    ``init``: ``weight`` uniform with variance 1/fan_in (fan_in = product of the trailing
    dims), ``bias`` N(0, 0.02), ``norm`` 1 + N(0, 0.02), ``layer_scale`` about 0.1,
    ``running_mean``, ``running_var`` (positive), ``count`` (int64), ``temperature`` (2.0),
    ``linspace`` (0.8 .. 1.2). ``values_of`` names the tensor whose values this one repeats
    (the tied head).
    """

    name: str
    shape: tuple[int, ...]
    init: str = "weight"
    values_of: str | None = None

    @property
    def dtype(self) -> str:
        return "int64" if self.init == "count" else "float"


def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> list[Tensor]:
    tensors = [Tensor(f"{prefix}.weight", (out, inp))]
    return tensors + ([Tensor(f"{prefix}.bias", (out,), "bias")] if bias else [])


def _conv(prefix: str, out: int, inp: int, k: int, bias: bool = True) -> list[Tensor]:
    """A Conv2d; ``inp`` is the input width per group (1 for depthwise)."""
    tensors = [Tensor(f"{prefix}.weight", (out, inp, k, k))]
    return tensors + ([Tensor(f"{prefix}.bias", (out,), "bias")] if bias else [])


def _norm(prefix: str, width: int, bias: bool = True) -> list[Tensor]:
    tensors = [Tensor(f"{prefix}.weight", (width,), "norm")]
    return tensors + ([Tensor(f"{prefix}.bias", (width,), "bias")] if bias else [])


def _batch_norm(prefix: str, width: int) -> list[Tensor]:
    return _norm(prefix, width) + [
        Tensor(f"{prefix}.running_mean", (width,), "running_mean"),
        Tensor(f"{prefix}.running_var", (width,), "running_var"),
        Tensor(f"{prefix}.num_batches_tracked", (), "count"),
    ]


# FastViTHD (fused/inference form, docs/reference-model.md §2.1) ---------------------------------


def _conv_ffn(prefix: str, width: int, ratio: int) -> list[Tensor]:
    return [
        *_conv(f"{prefix}.conv.conv", width, 1, 7, bias=False),
        *_batch_norm(f"{prefix}.conv.bn", width),
        *_conv(f"{prefix}.fc1", ratio * width, width, 1),
        *_conv(f"{prefix}.fc2", width, ratio * width, 1),
    ]


def _repmixer_block(prefix: str, width: int, ratio: int) -> list[Tensor]:
    return [
        *_conv(f"{prefix}.token_mixer.reparam_conv", width, 1, 3),
        *_conv_ffn(f"{prefix}.convffn", width, ratio),
        Tensor(f"{prefix}.layer_scale", (width, 1, 1), "layer_scale"),
    ]


def _attention_block(prefix: str, width: int, ratio: int) -> list[Tensor]:
    return [
        *_norm(f"{prefix}.norm", width),
        *_linear(f"{prefix}.token_mixer.qkv", 3 * width, width, bias=False),
        *_linear(f"{prefix}.token_mixer.proj", width, width),
        *_conv_ffn(f"{prefix}.convffn", width, ratio),
        Tensor(f"{prefix}.layer_scale_1", (width, 1, 1), "layer_scale"),
        Tensor(f"{prefix}.layer_scale_2", (width, 1, 1), "layer_scale"),
    ]


def _downsampler(prefix: str, inp: int, out: int) -> list[Tensor]:
    # grouped 7x7 (groups = inp, so one input channel per group), then a 1x1 MobileOne block
    assert out % inp == 0
    return [
        *_conv(f"{prefix}.proj.0.lkb_reparam", out, 1, 7),
        *_conv(f"{prefix}.proj.1.reparam_conv", out, out, 1),
    ]


def fastvit_tensors(d: Dims) -> list[Tensor]:
    p, widths = VISION_PREFIX, d.vision_widths
    tensors = [
        *_conv(f"{p}patch_embed.0.reparam_conv", widths[0], 3, 3),
        *_conv(f"{p}patch_embed.1.reparam_conv", widths[0], 1, 3),
        *_conv(f"{p}patch_embed.2.reparam_conv", widths[0], widths[0], 1),
    ]
    index = 0  # position in model.network: [stage0, down, stage1, down, stage2, down, cpe, ...]
    for stage, (width, depth) in enumerate(zip(widths, d.vision_layers)):
        attention = stage >= 3
        if stage > 0:
            tensors += _downsampler(f"{p}network.{index}", widths[stage - 1], width)
            index += 1
        if attention:  # RepCPE (fused): depthwise 7x7 + bias
            tensors += _conv(f"{p}network.{index}.reparam_conv", width, 1, 7)
            index += 1
        block = _attention_block if attention else _repmixer_block
        for i in range(depth):
            tensors += block(f"{p}network.{index}.{i}", width, d.vision_mlp_ratio)
        index += 1
    wide, se = d.mm_hidden_size, d.vision_se_width
    tensors += [
        *_conv(f"{p}conv_exp.reparam_conv", wide, 1, 3),  # groups = widths[-1]: 2 outputs each
        *_conv(f"{p}conv_exp.se.reduce", se, wide, 1),
        *_conv(f"{p}conv_exp.se.expand", wide, se, 1),
        Tensor(f"{p}head.proj", (wide, d.vision_proj_dim)),
    ]
    return tensors


# Projector and Qwen2 ---------------------------------------------------------------------------


def projector_tensors(d: Dims) -> list[Tensor]:
    return [
        *_linear("model.mm_projector.0", d.hidden_size, d.mm_hidden_size),
        *_linear("model.mm_projector.2", d.hidden_size, d.hidden_size),
    ]


def qwen2_tensors(d: Dims) -> list[Tensor]:
    h, kv = d.hidden_size, d.num_kv_heads * d.head_dim
    q = d.num_heads * d.head_dim
    assert d.vocab_size is not None, "resolve the vocabulary size first"
    tensors = [Tensor("model.embed_tokens.weight", (d.vocab_size, h))]
    for i in range(d.num_layers):
        p = f"model.layers.{i}"
        tensors += [
            *_norm(f"{p}.input_layernorm", h, bias=False),
            *_linear(f"{p}.self_attn.q_proj", q, h),
            *_linear(f"{p}.self_attn.k_proj", kv, h),
            *_linear(f"{p}.self_attn.v_proj", kv, h),
            *_linear(f"{p}.self_attn.o_proj", h, q, bias=False),
            *_norm(f"{p}.post_attention_layernorm", h, bias=False),
            *_linear(f"{p}.mlp.gate_proj", d.intermediate_size, h, bias=False),
            *_linear(f"{p}.mlp.up_proj", d.intermediate_size, h, bias=False),
            *_linear(f"{p}.mlp.down_proj", h, d.intermediate_size, bias=False),
        ]
    # config.json says tie_word_embeddings, and the release still writes lm_head: equal values.
    return tensors + [
        *_norm("model.norm", h, bias=False),
        Tensor("lm_head.weight", (d.vocab_size, h), values_of="model.embed_tokens.weight"),
    ]


# Mobile Conditioning Projector (docs/reference-model.md §2.4) ------------------------------------


def mcp_tensors(d: Dims) -> list[Tensor]:
    p, w = MCP_PREFIX, d.mcp_width
    tensors = [
        Tensor(f"{p}layer_weights", (d.mcp_layers,), "linspace"),
        Tensor(f"{p}temperature", (), "temperature"),
        *_linear(f"{p}input_compress.0", w, d.hidden_size),
        *_norm(f"{p}input_compress.1", w),
    ]
    for i in range(d.mcp_refiners):
        r = f"{p}sequence_refiners.{i}"
        tensors += [
            Tensor(f"{r}.conv.depthwise.weight", (w, 1, 3)),
            Tensor(f"{r}.conv.pointwise.weight", (w, w, 1)),
            *_norm(f"{r}.conv.norm", w),
            *_linear(f"{r}.channel_attn.fc.0", w // d.mcp_reduction, w, bias=False),
            *_linear(f"{r}.channel_attn.fc.2", w, w // d.mcp_reduction, bias=False),
            *_norm(f"{r}.norm", w),
        ]
    return tensors + [
        *_linear(f"{p}output_proj.0", d.caption_channels, w),
        *_norm(f"{p}output_proj.1", d.caption_channels),
    ]


# SANA DiT (diffusers SanaTransformer2DModel names, docs/reference-model.md §2.5) -----------------


def _sana_block(prefix: str, d: Dims) -> list[Tensor]:
    w, ffn = d.dit_width, d.dit_ffn_width
    tensors = [Tensor(f"{prefix}.scale_shift_table", (6, w))]
    for proj in ("to_q", "to_k", "to_v"):  # linear self-attention: no bias
        tensors += _linear(f"{prefix}.attn1.{proj}", w, w, bias=False)
    tensors += _linear(f"{prefix}.attn1.to_out.0", w, w)
    for proj in ("to_q", "to_k", "to_v"):  # cross-attention over the caption (width w)
        tensors += _linear(f"{prefix}.attn2.{proj}", w, w)
    tensors += _linear(f"{prefix}.attn2.to_out.0", w, w)
    return tensors + [  # GLUMBConv
        *_conv(f"{prefix}.ff.conv_inverted", 2 * ffn, w, 1),
        *_conv(f"{prefix}.ff.conv_depth", 2 * ffn, 1, 3),
        *_conv(f"{prefix}.ff.conv_point", w, ffn, 1, bias=False),
    ]


def sana_tensors(d: Dims) -> list[Tensor]:
    p, w = DIT_PREFIX, d.dit_width
    t = f"{p}time_embed"
    tensors = [
        *_conv(f"{p}patch_embed.proj", w, d.latent_channels, 1),
        *_linear(f"{t}.emb.timestep_embedder.linear_1", w, TIMESTEP_CHANNELS),
        *_linear(f"{t}.emb.timestep_embedder.linear_2", w, w),
        *_linear(f"{t}.linear", 6 * w, w),
        *_linear(f"{p}caption_projection.linear_1", w, d.caption_channels),
        *_linear(f"{p}caption_projection.linear_2", w, w),
        *_norm(f"{p}caption_norm", w, bias=False),
    ]
    for i in range(d.dit_layers):
        tensors += _sana_block(f"{p}transformer_blocks.{i}", d)
    return tensors + [
        Tensor(f"{p}scale_shift_table", (2, w)),
        *_linear(f"{p}proj_out", d.latent_channels, w),
    ]


# DC-AE (diffusers AutoencoderDC names, docs/reference-model.md §2.6) ------------------------------


def _res_block(prefix: str, width: int) -> list[Tensor]:
    return [
        *_conv(f"{prefix}.conv1", width, width, 3),
        *_conv(f"{prefix}.conv2", width, width, 3, bias=False),
        *_norm(f"{prefix}.norm", width),
    ]


def _efficientvit_block(
    prefix: str, width: int, scales: tuple[int, ...], head_dim: int
) -> list[Tensor]:
    a = f"{prefix}.attn"
    tensors = []
    for proj in ("to_q", "to_k", "to_v"):
        tensors += _linear(f"{a}.{proj}", width, width, bias=False)
    for j, k in enumerate(scales):  # depthwise kxk on [q|k|v], then 1x1 grouped by 3 * heads
        m = f"{a}.to_qkv_multiscale.{j}"
        tensors += _conv(f"{m}.proj_in", 3 * width, 1, k, bias=False)
        tensors += _conv(f"{m}.proj_out", 3 * width, head_dim, 1, bias=False)
    tensors += _linear(f"{a}.to_out", width, width * (1 + len(scales)), bias=False)
    tensors += _norm(f"{a}.norm_out", width)
    c = f"{prefix}.conv_out"  # GLUMBConv, expand 4
    return tensors + [
        *_conv(f"{c}.conv_inverted", 8 * width, width, 1),
        *_conv(f"{c}.conv_depth", 8 * width, 1, 3),
        *_conv(f"{c}.conv_point", width, 4 * width, 1, bias=False),
        *_norm(f"{c}.norm", width),
    ]


def _vae_block(prefix: str, d: Dims, stage: int) -> list[Tensor]:
    width = d.vae_widths[stage]
    if d.vae_block_types[stage] == "ResBlock":
        return _res_block(prefix, width)
    return _efficientvit_block(prefix, width, d.vae_multiscales[stage], d.vae_head_dim)


def dcae_encoder_tensors(d: Dims) -> list[Tensor]:
    p, widths = f"{VAE_PREFIX}encoder.", d.vae_widths
    tensors = _conv(f"{p}conv_in", widths[0], 3, 3)
    for stage, depth in enumerate(d.vae_encoder_layers):
        for i in range(depth):
            tensors += _vae_block(f"{p}down_blocks.{stage}.{i}", d, stage)
        if stage < len(widths) - 1:  # strided 3x3 conv (+ pixel-unshuffle shortcut)
            down = f"{p}down_blocks.{stage}.{depth}.conv"
            tensors += _conv(down, widths[stage + 1], widths[stage], 3)
    return tensors + _conv(f"{p}conv_out", d.latent_channels, widths[-1], 3)


def dcae_decoder_tensors(d: Dims) -> list[Tensor]:
    p, widths = f"{VAE_PREFIX}decoder.", d.vae_widths
    tensors = _conv(f"{p}conv_in", widths[-1], d.latent_channels, 3)
    for stage, depth in enumerate(d.vae_decoder_layers):
        first = 0
        if stage < len(widths) - 1:  # nearest x2 + 3x3 conv (+ pixel-shuffle shortcut)
            tensors += _conv(f"{p}up_blocks.{stage}.0.conv", widths[stage], widths[stage + 1], 3)
            first = 1
        for i in range(first, first + depth):
            tensors += _vae_block(f"{p}up_blocks.{stage}.{i}", d, stage)
    return tensors + [*_norm(f"{p}norm_out", widths[0]), *_conv(f"{p}conv_out", 3, widths[0], 3)]


def checkpoint_tensors(dims: Dims | str = "demo") -> list[Tensor]:
    """Every tensor of the checkpoint, sorted by name (as ``keys_full.txt`` lists them)."""
    d = resolve_dims(dims)
    tensors = (
        qwen2_tensors(d)
        + fastvit_tensors(d)
        + projector_tensors(d)
        + mcp_tensors(d)
        + sana_tensors(d)
        + dcae_encoder_tensors(d)
        + dcae_decoder_tensors(d)
    )
    names = [t.name for t in tensors]
    assert len(set(names)) == len(names), "duplicate tensor names"
    return sorted(tensors, key=lambda t: t.name)


def resolve_dims(dims: Dims | str) -> Dims:
    """A preset name or Dims, with the vocabulary size filled in from the tokenizer if unset."""
    d = PRESETS[dims] if isinstance(dims, str) else dims
    if d.vocab_size is None:
        d = dataclasses.replace(d, vocab_size=tokenizer_size())
    return d


# --------------------------------------------------------------------------------------------
# Values


_CHUNK = CHUNK_ELEMENTS  # values generated at a time: the full checkpoint's big tensors stream
_BATCHES_TRACKED = 10_000


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _values(t: Tensor, seed: int) -> Iterator[np.ndarray]:
    """Flat chunks of the tensor's values (float32, or int64 for counters)."""
    rng = _rng(seed, t.values_of or t.name)
    n = int(np.prod(t.shape, dtype=np.int64))
    if t.init == "weight":  # U(-a, a) with std 1/sqrt(fan_in); uniform is 5x faster than normal
        fan_in = max(int(np.prod(t.shape[1:], dtype=np.int64)), 1)
        a = np.float32(np.sqrt(3.0 / fan_in))
        for start in range(0, n, _CHUNK):
            u = rng.random(min(_CHUNK, n - start), dtype=np.float32)
            yield (u - np.float32(0.5)) * (2 * a)
        return
    if t.init == "bias":
        v = 0.02 * rng.standard_normal(n)
    elif t.init == "norm":
        v = 1.0 + 0.02 * rng.standard_normal(n)
    elif t.init == "layer_scale":
        v = 0.1 + 0.01 * rng.standard_normal(n)
    elif t.init == "running_mean":
        v = 0.1 * rng.standard_normal(n)
    elif t.init == "running_var":
        v = rng.uniform(0.5, 1.5, n)
    elif t.init == "temperature":
        v = np.full(n, 2.0)
    elif t.init == "linspace":
        v = np.linspace(0.8, 1.2, n)
    elif t.init == "count":
        yield np.full(n, _BATCHES_TRACKED, dtype=np.int64)
        return
    else:
        raise ValueError(f"unknown init {t.init!r} for {t.name}")
    yield v.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The file: the converter's writer, laid out as safetensors.torch.save_file lays out the release

FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # dtype argument -> code


def write_safetensors(path: Path, tensors: list[Tensor], seed: int, dtype: str = "bfloat16") -> None:
    """Write ``tensors`` with their values for ``seed`` as a safetensors file, a chunk at a time.

    The layout is ``safetensors.torch.save_file``'s: ``{"format": "pt"}`` metadata, the int64
    counters before the floats, each group by name. Written under ``NAME.partial`` and renamed,
    so ``path`` is complete or absent.
    """
    by_name = {t.name: t for t in tensors}
    plan = [PlannedTensor(t.name, "I64" if t.dtype == "int64" else FLOAT_DTYPES[dtype], t.shape) for t in tensors]
    partial = path.with_name(path.name + ".partial")
    writer = SafetensorsWriter(partial, plan, metadata={"format": "pt"}, widest_first=True)
    try:
        for name in writer.plan:  # in file order
            writer.write_chunks(name, _values(by_name[name], seed))
    finally:
        writer.close()
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# Configs


def checkpoint_config(d: Dims, ids: dict[str, int]) -> dict:
    """``config.json``: the released fields (Qwen2Config + LLaVA/Mobile-O), sizes from ``d``."""
    return {
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "max_position_embeddings": 32768,
        "max_window_layers": d.num_layers,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "tokenizer_model_max_length": 512,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
        "diffusion_name_or_path": DEFAULT_DIFFUSION_REPO,
        "vlm_num_layers": d.mcp_layers,
        "is_train": False,
        "vocab_size": d.vocab_size,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "mm_vision_tower": d.vision_tower,
        "mm_hidden_size": d.mm_hidden_size,
        "model_type": "mobile_o_inference",
        "architectures": ["MobileOForInferenceLM"],
    }


def transformer_config(d: Dims) -> dict:
    """``transformer/config.json``: SANA-600M's (diffusers ``SanaTransformer2DModel``), sizes from ``d``."""
    return {
        **TRANSFORMER_CONFIG,
        "attention_head_dim": d.dit_head_dim,
        "caption_channels": d.caption_channels,
        "cross_attention_dim": d.dit_width,
        "cross_attention_head_dim": d.dit_cross_head_dim,
        "in_channels": d.latent_channels,
        "mlp_ratio": d.dit_mlp_ratio,
        "num_attention_heads": d.dit_heads,
        "num_cross_attention_heads": d.dit_cross_heads,
        "num_layers": d.dit_layers,
        "out_channels": d.latent_channels,
        "sample_size": d.latent_size,
    }


def vae_config(d: Dims) -> dict:
    """``vae/config.json``: the DC-AE f32c32's (diffusers ``AutoencoderDC``), sizes from ``d``."""
    return {
        **VAE_CONFIG,
        "attention_head_dim": d.vae_head_dim,
        "decoder_block_out_channels": list(d.vae_widths),
        "decoder_block_types": list(d.vae_block_types),
        "decoder_layers_per_block": list(d.vae_decoder_layers),
        "decoder_qkv_multiscales": [list(s) for s in d.vae_multiscales],
        "encoder_block_out_channels": list(d.vae_widths),
        "encoder_block_types": list(d.vae_block_types),
        "encoder_layers_per_block": list(d.vae_encoder_layers),
        "encoder_qkv_multiscales": [list(s) for s in d.vae_multiscales],
        "latent_channels": d.latent_channels,
    }


# --------------------------------------------------------------------------------------------
# The folder


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint(
    folder: str | os.PathLike,
    dims: Dims | str = "demo",
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random Mobile-O checkpoint in the released layout into ``folder``; returns it.

    ``dims``: ``"demo"``, ``"full"`` or a :class:`Dims`; ``dtype``: the float tensors' dtype
    (``bfloat16`` as released, ``float16`` or ``float32``). Same arguments, same bytes.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, not {dtype!r}")
    d = resolve_dims(dims)
    if d.vocab_size < tokenizer_size():
        raise ValueError(f"vocab_size {d.vocab_size} is smaller than the tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    _write_json(folder / "config.json", checkpoint_config(d, token_ids()))
    _write_json(folder / "transformer" / "config.json", transformer_config(d))
    _write_json(folder / "vae" / "config.json", vae_config(d))
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_safetensors(folder / "model.safetensors", checkpoint_tensors(d), seed, dtype)
    return folder
