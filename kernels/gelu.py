"""Exact (erf) GELU for MLX's CPU backend: a native kernel beside its MLX twin.

``models.activations.gelu_fast`` computes GELU with MLX element-wise kernels, which MLX
compiles for baseline SSE2 and runs on one thread per CPU stream (~5 ns a value; the
FastViTHD vision tower spends ~1.6 s of a 1024² picture in it). ``native/gelu.c`` runs
the same algorithm, same operations and roundings, in 8-lane vectors on every core.

It runs outside MLX's graph and **in place**: the input is evaluated and its buffer
overwritten with the result, which is returned as the same array. Copying the result into
a new MLX array would cost more than the MLX form (``mx.array(numpy)``: ~0.6 ns a value),
so the native kernel serves only callers that own the input: a temporary nobody else holds
(FastViTHD's ``gelu(fc1(x))``, through ``activations.gelu(x, overwrite=True)``). Small or
non-float32 arrays, and calls inside function transformations (nothing can be evaluated
there) get the twin.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mobileo_mlx.kernels import _native

# Below this many values the twin wins (the synchronisation costs more).
MIN_VALUES = 1 << 18


def supported(x: mx.array) -> bool:
    return _native.enabled() and x.dtype == mx.float32 and x.size >= MIN_VALUES


def gelu_in_place(x: mx.array, twin) -> mx.array:
    """gelu(x) written into ``x``'s own buffer and returned as ``x`` (the caller hands over
    ``x``, a temporary no one else holds) where :func:`supported`, else ``twin(x)``."""
    if not supported(x) or not _native.evaluate(x):
        return twin(x)
    values = np.asarray(x)  # the array's own buffer
    if not (values.flags.c_contiguous and values.flags.writeable) or values.dtype != np.float32:
        return twin(x)
    _native.library().mobileo_gelu(values.ctypes.data, values.ctypes.data, values.size)
    return x


__all__ = ["MIN_VALUES", "gelu_in_place", "supported"]
