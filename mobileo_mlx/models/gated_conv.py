"""The middle of the GLU Mix-FFNs (SANA's and the DC-AE's ``GLUMBConv``) on the CPU:
SiLU -> depthwise conv (+ bias) over 2H channels -> values * SiLU(gate), H channels each.

MLX's CPU backend runs element-wise work on one thread per stream, so this runs as two
independent pieces, one per CPU stream (``platform.cpu_pieces``): the two halves of an even
batch (the CFG pair), otherwise two channel halves, each with its matching value and gate
channels. The depthwise conv runs on the value and gate channels separately (its weights
sliced), so both come out contiguous for the fused ``glu_silu``. Measured on 2 cores: a
SANA-600M FFN layer 85 -> 71.5 ms (CFG batch). The GPU path is the models' plain form."""

from __future__ import annotations

import mlx.core as mx

from mobileo_mlx.kernels.depthwise import depthwise_conv2d

from .. import platform
from . import activations


def gated_depthwise_cpu(h: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """h [B, H, W, 2C] (before the SiLU), weight [2C, k, k, 1], bias [2C] -> [B, H, W, C]."""
    batch, hidden = h.shape[0], h.shape[-1] // 2
    by_batch = batch % 2 == 0
    half = batch // 2 if by_batch else hidden // 2

    def piece(i: int) -> mx.array:
        # Measured: SiLU over a contiguous batch half, then the channel slices, is fastest
        # for a batch split; for a channel split, SiLU on the strided slices themselves.
        if by_batch:
            h_i = activations.silu(h[i * half : (i + 1) * half])
            values, gate = h_i[..., :hidden], h_i[..., hidden:]
            value_channels, gate_channels = slice(0, hidden), slice(hidden, None)
        else:
            lo, hi = i * half, (hidden if i else half)
            value_channels, gate_channels = slice(lo, hi), slice(hidden + lo, hidden + hi)
            values, gate = activations.silu(h[..., value_channels]), activations.silu(h[..., gate_channels])
        values = depthwise_conv2d(values, weight[value_channels], bias[value_channels])
        gate = depthwise_conv2d(gate, weight[gate_channels], bias[gate_channels])
        return activations.glu_silu(values, gate)

    return mx.concatenate(platform.cpu_pieces(2, piece), axis=0 if by_batch else -1)
