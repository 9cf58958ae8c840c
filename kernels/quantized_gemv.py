"""Quantized matrix-vector products for MLX's CPU backend: a native kernel and its MLX twin.

Decoding a token multiplies a handful of rows by every weight of the language model. On
the CPU, MLX's ``quantized_matmul`` does this in a scalar loop on one thread (~1 ns a
4-bit weight); ``native/quantized_gemv.c`` reads the same packed weights (MLX's affine
layout, not copied) with 8-lane vectors on every core: ~0.05 ns a weight, 18-20x faster.

The native kernel runs outside MLX's graph: the input is evaluated, handed over as a
NumPy view, and the output comes back as a new array. That costs one synchronisation per
layer, negligible next to a decoding step. The twin, ``mx.quantized_matmul``, runs on
every other backend, when the library was not built, under ``MOBILEO_MLX_KERNELS=twin``
or ``reference``, inside function transformations (``mx.compile``, ``mx.grad``) and for
the shapes the kernel does not take (see :func:`supported`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mobileo_mlx.kernels import _native

MAX_ROWS = 8  # the kernel keeps one accumulator per row in registers


def status() -> str:
    """One line for ``mobileo-mlx doctor``."""
    library = _native.library()
    if library is None:
        return f"MLX quantized_matmul (native kernel {_native.error()})"
    return f"native kernel, {library.mobileo_quantized_gemv_threads(0)} threads"


def supported(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> bool:
    """Whether :func:`quantized_gemv` takes this product natively (else: the MLX twin)."""
    if not _native.enabled():
        return False
    rows = x.size // max(1, x.shape[-1])
    per_word = 32 // bits if bits in (4, 8) else 0
    return (0 < rows <= MAX_ROWS and per_word and group_size % (8 * per_word) == 0
            and x.shape[-1] % group_size == 0 and packed.ndim == 2 and packed.dtype == mx.uint32
            and packed.shape[1] * per_word == x.shape[-1] and x.dtype == mx.float32
            and scales.dtype == mx.float32 and biases.dtype == mx.float32)


def _twin(x, packed, scales, biases, bits, group_size):
    return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group_size, bits=bits)


def quantized_gemv(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                   group_size: int) -> mx.array:
    """``x @ W.T`` for ``W`` quantized in MLX's affine layout (``mx.quantize``): x [..., K]
    with at most ``MAX_ROWS`` rows, packed [N, K * bits / 32] -> [..., N]."""
    if not supported(x, packed, scales, biases, bits, group_size) or not _native.evaluate(x):
        return _twin(x, packed, scales, biases, bits, group_size)
    k, n = x.shape[-1], packed.shape[0]
    rows = x.size // k
    xs = _native.c_view(x.reshape(rows, k), np.float32)
    weight = _native.c_view(packed, np.uint32)
    scale, bias = _native.c_view(scales, np.float32), _native.c_view(biases, np.float32)
    out = np.empty((rows, n), np.float32)
    code = _native.library().mobileo_quantized_gemv(xs.ctypes.data, rows, k, weight.ctypes.data, scale.ctypes.data,
                                                    bias.ctypes.data, n, bits, group_size, out.ctypes.data)
    if code != 0:
        return _twin(x, packed, scales, biases, bits, group_size)
    return mx.array(out).reshape(*x.shape[:-1], n)


__all__ = ["MAX_ROWS", "quantized_gemv", "status", "supported"]
