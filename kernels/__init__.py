"""Custom kernels beside their plain-MLX twins, dispatched by backend at run time.

* ``depthwise_conv2d``, ``depthwise_conv1d``, ``glu_depthwise_conv2d`` (kernels.depthwise)
* ``relu_linear_attention`` (kernels.linear_attention)
* ``quantized_gemv`` (kernels.quantized_gemv): decoding's quantized products
* ``bf16_matmul.bf16_products`` (kernels.bf16_matmul): bfloat16 CPU GEMMs (AVX512-BF16)
* ``gelu.gelu_in_place`` (kernels.gelu): the exact GELU, in place

On Metal the custom ``mx.fast.metal_kernel`` bodies in ``kernels.metal`` run; on every
other backend (CPU, CUDA) the plain-MLX twins do, except where the native CPU kernels
(``kernels/native/*.c``: the three above and large depthwise convs) serve MLX's CPU backend. ``MOBILEO_MLX_KERNELS=twin`` forces the
twins on Metal too (``reference``: the plainest MLX ops everywhere). See kernels/README.md.
"""

import mobileo_mlx  # noqa: F401  (BLAS routing side effect, before mlx.core loads)

from ._dispatch import ENV, mode, use_metal  # noqa: E402,F401
from .depthwise import depthwise_conv1d, depthwise_conv2d, glu_depthwise_conv2d  # noqa: E402,F401
from .linear_attention import relu_linear_attention  # noqa: E402,F401
