"""Build steps that pyproject.toml cannot express: the Linux BLAS shim and the CPU kernel.

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

# The CPU kernel for quantized matrix-vector products (token-by-token decoding), loaded
# with ctypes by kernels/quantized_gemv.py. Optional: without a C compiler the package
# installs and MLX's quantized_matmul does the work.
ext_modules.append(
    Extension(
        "kernels.native.quantized_gemv",
        sources=["kernels/native/quantized_gemv.c"],
        extra_compile_args=["-O3", "-Wno-psabi"],
        optional=True,
    )
)

setup(ext_modules=ext_modules)
