"""Build steps that pyproject.toml cannot express: the Linux BLAS shim and the CPU kernels.

On Linux the package carries a tiny shared library that forwards MLX's
``cblas_sgemm``/``dgemm``/``cgemm`` to OpenBLAS from ``scipy-openblas32``
(see ``mobileo_mlx/_blas.py``). macOS needs nothing: MLX uses Accelerate.
"""
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mobileo_mlx._native.blas_shim",
            sources=["mobileo_mlx/_native/blas_shim.c"],
            # The scipy_* symbols are left undefined on purpose; they resolve
            # against libscipy_openblas.so, loaded globally first at run time.
            extra_compile_args=["-O2"],
        )
    )

# The CPU kernels (kernels/native: quantized matrix-vector products for decoding, the
# bfloat16 GEMM, GELU, depthwise conv), loaded with ctypes by kernels/_native.py. Optional: without a C compiler
# the package still installs and MLX's own operations do the work.
ext_modules.append(
    Extension(
        "kernels.native.cpu_kernels",
        sources=["kernels/native/quantized_gemv.c", "kernels/native/bf16_gemm.c", "kernels/native/gelu.c",
                 "kernels/native/depthwise.c", "kernels/native/pool.c"],
        depends=["kernels/native/pool.h", "kernels/native/vec8.h"],
        # no fused multiply-adds: gelu.c rounds as the MLX form it mirrors
        extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
        optional=True,
    )
)

setup(ext_modules=ext_modules)
