"""MLX's CPU backend: which plain module becomes which CPU form, per component.

The forms (``layers``, ``quantized``) compute what the plain modules compute; where the
arithmetic is the same (everything but the bfloat16 products and the fast activations'
last-ulp differences from MLX's built-ins) tests/test_backends.py holds them bit for bit
to each other's paths, and tests/test_golden.py the whole pipeline.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.models import qwen2

from mobileo_mlx.backends.cpu import layers, quantized
from mobileo_mlx.models import common, dcae, fastvit, sana

# Every component: activations, depthwise convs, attention cores, quantized layers.
_COMMON = {
    nn.SiLU: layers.SiLU,
    nn.Sigmoid: layers.Sigmoid,
    nn.GELU: layers.GELU,
    common.DepthwiseConv: layers.DepthwiseConv,
    common.ScaledDotProductAttention: layers.ScaledDotProductAttention,
    common.ReLULinearAttention: layers.ReLULinearAttention,
    sana.GLUMBConv: layers.GLUMBConv,
    common.RMSNorm: layers.RMSNorm,
    sana.SanaTransformerBlock: layers.SanaTransformerBlock,
    sana.SanaModulatedNorm: layers.SanaModulatedNorm,
    nn.QuantizedLinear: quantized.QuantizedLinear,
    nn.QuantizedEmbedding: quantized.QuantizedEmbedding,
}
_LANGUAGE = {qwen2.MLP: layers.Qwen2MLP, qwen2.Attention: layers.Qwen2Attention}
_VISION = {fastvit.RepMixerBlock: layers.RepMixerBlock, fastvit.AttentionBlock: layers.AttentionBlock}
# The DC-AE's 3x3 convs (and only its: FastViT's stem conv is strided), its blocks, LiteMLA's grouped 1x1 conv.
_DECODER = {nn.Conv2d: layers.Conv2d, dcae.ResBlock: layers.ResBlock, dcae.DCUpBlock2d: layers.DCUpBlock2d,
            dcae.GroupedPointwise: layers.GroupedPointwise}
_DECODER_BF16 = {**_DECODER, nn.Conv2d: layers.Bf16Conv2d, dcae.ResBlock: layers.Bf16ResBlock,
                 dcae.DCUpBlock2d: layers.Bf16DCUpBlock2d,
                 dcae.SanaMultiscaleLinearAttention: layers.SanaMultiscaleLinearAttention}
# The DiT's and the VAE's layers never multiply a handful of rows: 8-bit weights K-major.
K_MAJOR_COMPONENTS = ("dit", "vae")


def table(component: str, matmul: str = "fp32") -> dict:
    """The swap table of ``component`` (``models.MODELS``); ``matmul="bf16"``: its matrix
    products (Linear layers, quantized ones, the VAE's convs) with bfloat16 operands; the language
    model's only inside ``backends.stage(encoding=True)`` (a prompt encoded, no token chosen)."""
    bf16 = matmul == "bf16"
    forms = dict(_COMMON)
    if component == "language":
        forms.update(_LANGUAGE)
    if component == "vision":
        forms.update(_VISION)
    if component == "vae":
        forms.update(_DECODER_BF16 if bf16 else _DECODER)
    if component in K_MAJOR_COMPONENTS:
        forms[nn.QuantizedLinear] = quantized.Bf16KMajorQuantizedLinear if bf16 else quantized.KMajorQuantizedLinear
    elif bf16 and component == "language":  # bf16 only while a stage encodes a prompt
        forms[nn.QuantizedLinear] = quantized.EncodingQuantizedLinear
    elif bf16:
        forms[nn.QuantizedLinear] = quantized.Bf16QuantizedLinear
    if bf16:
        forms[nn.Linear] = layers.EncodingLinear if component == "language" else layers.Bf16Linear
    return forms
