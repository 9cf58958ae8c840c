"""Exact (erf) GELU for MLX's CPU backend: a native kernel beside its MLX twin.

``models.activations.gelu_fast`` computes GELU with MLX element-wise kernels, which MLX
compiles for baseline SSE2 and runs on one thread per CPU stream (~5 ns a value; the
FastViTHD vision tower spends ~1.6 s of a 1024² picture in it). ``native/gelu.c`` runs
the same algorithm, same operations and roundings, in 8-lane vectors on every core.

It runs outside MLX's graph and **in place**: the input is evaluated and its buffer
overwritten with the result, which is returned as the same array. Copying the result into
a new MLX array would cost more than the MLX form (``mx.array(numpy)``: ~0.6 ns a value),
so the native kernel serves only callers that own the input: an evaluated temporary nobody
else holds (FastViTHD's ``gelu(fc1(x))``), declared with ``overwrite=True``. Everything
else, small or non-float32 arrays, and calls inside function transformations (nothing can
be evaluated there) get the twin.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np

from . import _native
from ._dispatch import mode, on_cpu

# Below this many values the twin wins (the synchronisation and the copy cost more).
MIN_VALUES = 1 << 18
_lock = threading.Lock()


def supported(x: mx.array) -> bool:
    return (mode() == "auto" and on_cpu() and x.dtype == mx.float32 and x.size >= MIN_VALUES
            and _native.library() is not None)


def gelu(x: mx.array, twin, overwrite: bool = False) -> mx.array:
    """gelu(x): natively and in place when ``overwrite`` (the caller hands over ``x``, a
    temporary no one else holds) and :func:`supported`, else ``twin(x)``."""
    if not overwrite or not supported(x):
        return twin(x)
    try:
        mx.eval(x)
    except (ValueError, RuntimeError):  # inside mx.compile / mx.grad
        return twin(x)
    values = np.asarray(x)  # the array's own buffer
    if not (values.flags.c_contiguous and values.flags.writeable) or values.dtype != np.float32:
        return twin(x)
    with _lock:
        _native.library().mobileo_gelu(values.ctypes.data, values.ctypes.data, values.size)
    return x


__all__ = ["MIN_VALUES", "gelu", "supported"]
