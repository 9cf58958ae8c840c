"""Build step that pyproject.toml cannot express: the Linux BLAS shim.

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

setup(ext_modules=ext_modules)
