"""The compiled CPU kernels (kernels/native/*.c, built by setup.py into one shared library),
loaded once with ctypes. ``library()`` is None when they were not built.

Also the few steps every Python wrapper of a kernel that runs outside MLX's graph shares:
whether the kernels serve here (:func:`enabled`), evaluating the inputs (:func:`evaluate`,
impossible inside function transformations) and reading them as C arrays (:func:`c_view`).
Calls need no lock here: the kernels' thread pool runs one call at a time (pool.c)."""

from __future__ import annotations

import ctypes
import glob
from pathlib import Path

import mlx.core as mx
import numpy as np

from mobileo_mlx.kernels._dispatch import mode, on_cpu

_DIR = Path(__file__).resolve().parent / "native"
_library: ctypes.CDLL | None = None
_error: str | None = None

_pointer, _int, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "mobileo_quantized_gemv": ([_pointer, _int, _int, _pointer, _pointer, _pointer, _int, _int, _int, _pointer], _int),
    "mobileo_quantized_gemv_threads": ([_int], _int),
    "mobileo_gelu": ([_pointer, _pointer, ctypes.c_long], _int),
    "mobileo_depthwise_conv2d": ([_pointer, _int, _int, _int, _int, _pointer, _int, _int, _pointer, _int, _int,
                                  _int, _int, _pointer, _int, _int], _int),
    "mobileo_bf16_gemm_supported": ([], _int),
    "mobileo_bf16_products_done": ([], ctypes.c_long),
    "mobileo_bf16_release": ([], None),
    "mobileo_bf16_min_product": ([ctypes.c_long], ctypes.c_long),
    "mobileo_bf16_sgemm": ([_int, _int, _int, _int, _int, _int, _float, _pointer, _int, _pointer, _int, _float,
                            _pointer, _int], _int),
}


def library() -> ctypes.CDLL | None:
    global _library, _error
    if _library is not None or _error is not None:
        return _library
    candidates = sorted(glob.glob(str(_DIR / "cpu_kernels*.so")))
    if not candidates:
        _error = "not built (no C compiler when the package was installed?)"
        return None
    try:
        loaded = ctypes.CDLL(candidates[0])
        for name, (arguments, result) in _SIGNATURES.items():
            function = getattr(loaded, name)
            function.argtypes, function.restype = arguments, result
    except (OSError, AttributeError) as error:
        _error = str(error)
        return None
    _library = loaded
    return loaded


def error() -> str | None:
    """Why :func:`library` is None."""
    library()
    return _error


def enabled() -> bool:
    """The native kernels serve this call: MLX's CPU backend, ``MOBILEO_MLX_KERNELS`` unset or
    ``auto``, and the library built."""
    return mode() == "auto" and on_cpu() and library() is not None


def evaluate(*arrays: mx.array) -> bool:
    """Evaluate the arrays a kernel reads; False inside ``mx.compile`` / ``mx.grad``, where
    nothing can be evaluated (the caller then takes its MLX twin)."""
    try:
        mx.eval(*arrays)
    except (ValueError, RuntimeError):
        return False
    return True


def c_view(a: mx.array, dtype) -> np.ndarray:
    """An evaluated array as a C-contiguous NumPy array of ``dtype``: its own buffer when it
    already is one, else a copy."""
    view = np.asarray(a)
    return view if view.dtype == dtype and view.flags.c_contiguous else np.ascontiguousarray(view, dtype)
