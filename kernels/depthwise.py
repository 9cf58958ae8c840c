"""Depthwise (and channel-multiplier grouped) convolutions, NHWC / NLC.

These plain-MLX functions are the reference twins of the custom kernels; model
code calls them (never ``mx.conv2d(groups=C)`` directly) so a faster path can be
dispatched by backend in one place.
"""

from __future__ import annotations

import mlx.core as mx


def depthwise_conv2d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int | None = None,
) -> mx.array:
    """Grouped conv with ``groups = C_in``: x [B,H,W,C_in], weight [C_out,kh,kw,1]
    (C_out a multiple of C_in; output channel o reads input channel o // (C_out/C_in)),
    bias [C_out] or None. ``padding`` defaults to ``kh // 2`` (same size at stride 1)."""
    pad = weight.shape[1] // 2 if padding is None else padding
    y = mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])
    return y + bias if bias is not None else y


def depthwise_conv1d(
    x: mx.array, weight: mx.array, bias: mx.array | None = None, padding: int | None = None
) -> mx.array:
    """Depthwise conv over a sequence: x [B,L,C], weight [C,k,1], bias [C] or None."""
    pad = weight.shape[1] // 2 if padding is None else padding
    y = mx.conv1d(x, weight, padding=pad, groups=x.shape[-1])
    return y + bias if bias is not None else y
