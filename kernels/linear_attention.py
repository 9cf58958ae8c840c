"""ReLU linear attention (SANA's self-attention, the DC-AE's LiteMLA) by the Metal kernel: a
two-pass kernel (``kernels.metal``: fp32 kv / ksum per batch and head, then the normalised
product with relu(q)), reading q / k / v through their strides so the transposed views the
models build are not copied. Its plain-MLX form, which the tests hold it to, is the models'
own ``mobileo_mlx.models.common.relu_linear_attention``; the backend chooses between them.
"""

from __future__ import annotations

import mlx.core as mx


def metal_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
    from mobileo_mlx.kernels.metal import MetalKernels

    return MetalKernels.linear_attention_supported(q, k, v)


def metal(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """q, k, v: [B, heads, N, d] (k / v may have another N than q) -> [B, heads, N, d_v] in v's
    dtype, accumulated in float32."""
    from mobileo_mlx.kernels.metal import kernels

    return kernels().linear_attention(q, k, v, eps)


__all__ = ["metal", "metal_supported"]
