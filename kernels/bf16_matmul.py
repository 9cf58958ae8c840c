"""bfloat16 products for MLX's CPU matmuls, where the CPU has AVX512-BF16.

Within :func:`bf16_products`, every float32 matrix product MLX's CPU backend evaluates
(``cblas_sgemm``, routed through our BLAS shim) that is large enough runs in
``native/bf16_gemm.c``: both operands rounded to bfloat16 (nearest even), products summed
in float32 by VDPBF16PS, which does twice the multiply-adds of an fp32 FMA. Measured at
the DiT's shapes: 350-395 GFLOP/s on 2 Zen 4 cores against OpenBLAS's 200 in fp32.
Everything else (element-wise work, norms, softmax, small products) stays float32: this
is the GPUs' half-precision compute, with float32 accumulation, not a bf16 model.

The switch is process-wide while the context is open (MLX evaluates on its own threads),
so the pipeline opens it only around the evaluation of the stages it serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

from mobileo_mlx import _blas

from mobileo_mlx.kernels import _native

ENV = "MOBILEO_MLX_CPU_MATMUL"
CHOICES = ("auto", "fp32", "bf16")
_lock = threading.Lock()
_depth = 0


def unavailable_reason() -> str | None:
    """None when bf16 products can run here, else why not (one line)."""
    library = _native.library()
    if library is None:
        return f"the CPU kernels are {_native.error()}"
    if not library.mobileo_bf16_gemm_supported():
        return "this CPU has no AVX512-BF16"
    if not _blas.sgemm_hookable():
        return f"MLX's sgemm is not routed through our shim ({_blas.status().provider})"
    return None


def available() -> bool:
    return unavailable_reason() is None


def resolve(choice: str | None = None) -> str:
    """``fp32`` or ``bf16`` for a choice of auto / fp32 / bf16 (default: ``$MOBILEO_MLX_CPU_MATMUL``,
    else auto = bf16 where available). Asking for bf16 where it cannot run is an error."""
    value = (choice or os.environ.get(ENV, "") or "auto").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"CPU matmul precision {value!r}: expected one of {', '.join(CHOICES)}")
    if value == "auto":
        return "bf16" if available() else "fp32"
    if value == "bf16" and not available():
        raise ValueError(f"bf16 CPU matmuls are not available: {unavailable_reason()}")
    return value


@contextlib.contextmanager
def bf16_products(enabled: bool = True):
    """MLX's large float32 CPU matmuls evaluated inside run with bfloat16 inputs (see above).
    Nests; ``enabled=False`` (or no AVX512-BF16) makes it a no-op."""
    global _depth
    if not enabled or not available():
        yield False
        return
    library = _native.library()
    with _lock:
        _depth += 1
        if _depth == 1:
            _blas.set_sgemm_hook(ctypes.cast(library.mobileo_bf16_sgemm, ctypes.c_void_p).value)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _blas.set_sgemm_hook(None)
                library.mobileo_bf16_release()  # its packing buffers (tens of MB for the vision tower)


def products_done() -> int:
    """How many products the bf16 kernel has computed in this process (for tests and benchmarks)."""
    library = _native.library()
    return int(library.mobileo_bf16_products_done()) if library is not None else 0


def min_product(value: int | None = None) -> int:
    """The smallest product (m * n * k multiply-adds) the kernel takes; smaller ones stay with
    OpenBLAS. Sets it when ``value`` is given (tests use 0 to reach small models)."""
    library = _native.library()
    if library is None:
        return 0
    return int(library.mobileo_bf16_min_product(-1 if value is None else int(value)))


def sgemm(a, b, c, *, alpha: float = 1.0, beta: float = 0.0, trans_a: bool = False, trans_b: bool = False) -> int:
    """The kernel on NumPy float32 arrays (row-major, for tests and benchmarks):
    c = alpha * op(a) @ op(b) + beta * c. Returns 0, or -1 when it declined the product."""
    library = _native.library()
    if library is None:
        return -1
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    return library.mobileo_bf16_sgemm(101, 112 if trans_a else 111, 112 if trans_b else 111, m, n, k, alpha,
                                      a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], beta, c.ctypes.data,
                                      c.shape[1])


__all__ = ["CHOICES", "ENV", "available", "bf16_products", "min_product", "products_done", "resolve", "sgemm",
           "unavailable_reason"]
