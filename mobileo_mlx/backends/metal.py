"""Metal: the forms that call the project's Metal kernels (``kernels.metal``, built with
``mx.fast.metal_kernel``; verified on Linux by the emulator in tests/mslemu).

* depthwise convs (and the MCP's over a sequence): conv + bias in one pass;
* GLUMBConv's middle: depthwise conv + bias + ``a * SiLU(g)`` fused, the 2C-channel
  intermediate never reaching memory;
* ReLU linear attention: two passes, q / k / v read through their strides (no copies of the
  transposed views).

Shapes and dtypes a kernel does not take, and ``MOBILEO_MLX_KERNELS=twin``, run the plain
module (its plain-MLX twin).
"""

from __future__ import annotations

import mlx.core as mx

from mobileo_mlx.backends import kernels_mode
from mobileo_mlx.kernels import depthwise as depthwise_kernels
from mobileo_mlx.kernels import linear_attention as linear_attention_kernels
from mobileo_mlx.models import common, sana


def use_kernels() -> bool:
    return kernels_mode() == "auto"


class DepthwiseConv(common.DepthwiseConv):
    def __call__(self, x: mx.array) -> mx.array:
        if self.weight.ndim == 3:  # over a sequence [B, L, C]: a 1 x k conv of [B, 1, L, C]
            x4, w4, stride, padding = x[:, None], self.weight[:, None], (1, self.stride), (0, self.padding)
        else:
            x4, w4, stride, padding = x, self.weight, self.stride, self.padding
        if not (use_kernels() and depthwise_kernels.metal_supported(x4, w4, stride, padding)):
            return super().__call__(x)
        y = depthwise_kernels.metal(x4, w4, self.get("bias"), stride, padding)
        return y[:, 0] if self.weight.ndim == 3 else y


class GLUMBConv(sana.GLUMBConv):
    def __call__(self, x: mx.array) -> mx.array:
        h = self.nonlinearity(self.conv_inverted(x))
        conv = self.conv_depth
        if use_kernels() and conv.stride == 1 and depthwise_kernels.metal_supported(h, conv.weight, 1, conv.padding):
            gated = depthwise_kernels.metal_glu(h, conv.weight, conv.bias, conv.padding)
        else:
            h, gate = mx.split(conv(h), 2, axis=-1)
            gated = h * self.nonlinearity(gate)
        h = self.conv_point(gated)
        if self.norm is not None:
            h = self.norm(h)
        return h + x if self.residual_connection else h


class ReLULinearAttention(common.ReLULinearAttention):
    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        if not (use_kernels() and linear_attention_kernels.metal_supported(q, k, v)):
            return super().__call__(q, k, v)
        return linear_attention_kernels.metal(q, k, v, self.eps)


# The same for every component.
TABLE = {
    common.DepthwiseConv: DepthwiseConv,
    sana.GLUMBConv: GLUMBConv,
    common.ReLULinearAttention: ReLULinearAttention,
}
