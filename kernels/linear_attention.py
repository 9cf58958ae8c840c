"""ReLU linear attention (SANA self-attention, DC-AE LiteMLA).

On Metal a two-pass custom kernel runs (``kernels.metal``: fp32 kv / ksum per batch and
head, then the normalised product with relu(q), reading q/k/v through their strides so
the transposed views callers build are not copied); everywhere else the plain-MLX twin.
"""

from __future__ import annotations

import mlx.core as mx

from mobileo_mlx import platform

from mobileo_mlx.kernels._dispatch import on_cpu, use_metal


def relu_linear_attention_reference(q: mx.array, k: mx.array, v: mx.array, eps: float = 1e-15) -> mx.array:
    """The plain-MLX twin (also the reference). See ``relu_linear_attention``."""
    dtype = v.dtype
    q = mx.maximum(q.astype(mx.float32), 0)
    k = mx.maximum(k.astype(mx.float32), 0)
    v = v.astype(mx.float32)
    kv = mx.swapaxes(k, -1, -2) @ v                    # [B, H, d, d_v]
    k_sum = mx.sum(k, axis=-2, keepdims=True)           # [B, H, 1, d]
    numerator = q @ kv                                  # [B, H, N, d_v]
    denominator = mx.sum(q * k_sum, axis=-1, keepdims=True)  # [B, H, N, 1]
    return (numerator / (denominator + eps)).astype(dtype)


def relu_linear_attention(q: mx.array, k: mx.array, v: mx.array, eps: float = 1e-15) -> mx.array:
    """q, k, v: [B, heads, N, d] (any float dtype; k/v may have another N than q).

    out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps),
    accumulated in float32 with no 1/sqrt(d) scaling; returned in v's dtype.
    """
    if use_metal():
        from mobileo_mlx.kernels.metal import MetalKernels, kernels

        if MetalKernels.linear_attention_supported(q, k, v):
            return kernels().linear_attention(q, k, v, eps)
    if on_cpu():
        return _split_over_cpu_streams(q, k, v, eps)
    return relu_linear_attention_reference(q, k, v, eps)


# MLX runs element-wise work on one thread per CPU stream: a large call with an even batch
# (SANA's CFG pair) runs as two batch halves, one per stream (platform.cpu_pieces): 3 -> 2 ms
# per SANA-600M layer. Splitting the heads of one image (the DC-AE's LiteMLA) was slower
# (94 -> 110 ms at 64x64: strided head slices and the join), so a single image runs whole.
SPLIT_MIN_ELEMENTS = 1 << 18


def _split_over_cpu_streams(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    batch = q.shape[0]
    if (batch % 2 or q.size + k.size + v.size < SPLIT_MIN_ELEMENTS
            or not platform.may_split_over_streams()):
        return relu_linear_attention_reference(q, k, v, eps)
    half = batch // 2

    def piece(i: int) -> mx.array:
        part = slice(i * half, (i + 1) * half)
        return relu_linear_attention_reference(q[part], k[part], v[part], eps)

    return mx.concatenate(platform.cpu_pieces(2, piece))


__all__ = ["relu_linear_attention", "relu_linear_attention_reference"]
