"""Build steps that pyproject.toml cannot express: the compiled libraries, all from
``kernels/native/`` and installed into ``mobileo_mlx/kernels/native/``.

* ``blas_shim`` (Linux): forwards MLX's ``cblas_sgemm``/``dgemm``/``cgemm`` to OpenBLAS from
  ``scipy-openblas32`` (see ``mobileo_mlx/_blas.py``). macOS needs nothing: MLX uses Accelerate.
* ``cpu_kernels``: our CPU kernels (quantized matrix-vector products for decoding, the
  bfloat16 GEMM, GELU, depthwise conv), loaded with ctypes by ``kernels/_native.py``.
  Optional: without a C compiler the package still installs and MLX's own operations do the
  work.
"""
import sys

from setuptools import Extension, setup

NATIVE = "kernels/native"

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mobileo_mlx.kernels.native.blas_shim",
            sources=[f"{NATIVE}/blas_shim.c"],
            # The scipy_* symbols are left undefined on purpose; they resolve
            # against libscipy_openblas.so, loaded globally first at run time.
            extra_compile_args=["-O2"],
        )
    )

ext_modules.append(
    Extension(
        "mobileo_mlx.kernels.native.cpu_kernels",
        sources=[f"{NATIVE}/{name}.c" for name in ("quantized_gemv", "bf16_gemm", "gelu", "depthwise", "pool")],
        depends=[f"{NATIVE}/pool.h", f"{NATIVE}/vec8.h"],
        # no fused multiply-adds: gelu.c rounds as the MLX form it mirrors
        extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
        optional=True,
    )
)

setup(ext_modules=ext_modules)
