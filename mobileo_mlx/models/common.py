"""Building blocks several models share, in plain MLX.

Each operation a backend may want to run its own way is a module here (a depthwise conv, an
attention core), so that ``mobileo_mlx.backends`` can swap it for a faster form of the same
computation at load time; the models themselves stay the reference's arithmetic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class BaseModelArgs:
    """A config dataclass read from a config section, keys it does not know ignored: mlx-lm's
    ``BaseModelArgs``, restated because importing anything of ``mlx_lm`` runs its package
    ``__init__``, which loads transformers (and torch, where installed): a cost the picture
    models and the converter's demo writer should not pay."""

    @classmethod
    def from_dict(cls, params: dict):
        known = inspect.signature(cls).parameters
        return cls(**{key: value for key, value in params.items() if key in known})


class DepthwiseConv(nn.Module):
    """A convolution with ``groups = in_channels``: ``nn.Conv2d(..., groups=C)`` (with a
    weight of one spatial axis, ``nn.Conv1d``'s). Output channel ``o`` reads input channel
    ``o // (out_channels / in_channels)``; weight [C_out, k, k, 1] (or [C_out, k, 1]),
    same padding by default."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, bias: bool = True, dims: int = 2):
        super().__init__()
        if out_channels % in_channels:
            raise ValueError(f"{out_channels} output channels are not a multiple of {in_channels} groups")
        scale = kernel_size**-1.0 if dims == 2 else kernel_size**-0.5
        self.weight = mx.random.uniform(-scale, scale, (out_channels, *(kernel_size,) * dims, 1))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding

    def __call__(self, x: mx.array) -> mx.array:
        groups = x.shape[-1]
        if self.weight.ndim == 3:
            y = mx.conv1d(x, self.weight, stride=self.stride, padding=self.padding, groups=groups)
        else:
            y = mx.conv2d(x, self.weight, stride=self.stride, padding=self.padding, groups=groups)
        return y + self.bias if "bias" in self else y


class RMSNorm(nn.Module):
    """diffusers' ``RMSNorm`` with weight and bias (statistics in float32)."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) + self.bias


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T * scale + mask) v, q [B, heads, N, d], k / v [B, heads, L, d], with an
    additive ``mask`` broadcastable to the scores."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def relu_linear_attention(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """out_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps) for
    q, k, v [B, heads, N, d] (k / v may have another N than q), accumulated in float32 with
    no 1/sqrt(d) scaling, returned in v's dtype. diffusers pads v with a row of ones to get
    the denominator from the same product; this sums relu(k) instead (the same terms)."""
    dtype = v.dtype
    q = mx.maximum(q.astype(mx.float32), 0)
    k = mx.maximum(k.astype(mx.float32), 0)
    v = v.astype(mx.float32)
    kv = mx.swapaxes(k, -1, -2) @ v  # [B, heads, d, d_v]
    k_sum = mx.sum(k, axis=-2, keepdims=True)  # [B, heads, 1, d]
    numerator = q @ kv  # [B, heads, N, d_v]
    denominator = mx.sum(q * k_sum, axis=-1, keepdims=True)  # [B, heads, N, 1]
    return (numerator / (denominator + eps)).astype(dtype)


class ReLULinearAttention(nn.Module):
    """:func:`relu_linear_attention` (SANA's self-attention, the DC-AE's LiteMLA)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return relu_linear_attention(q, k, v, self.eps)


# diffusers' get_activation names -> MLX modules.
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish}


def activation(name: str) -> nn.Module:
    """diffusers' ``get_activation(name)``: torch's ``nn.GELU()`` is the exact (erf) form, as MLX's."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
