"""Build steps that pyproject.toml cannot express: the compiled libraries, all from
``kernels/native/`` and installed into ``mobileo_mlx/kernels/native/``.

* ``blas_shim`` (Linux): forwards MLX's ``cblas_sgemm``/``dgemm``/``cgemm`` to OpenBLAS from
  ``scipy-openblas32`` (see ``mobileo_mlx/_blas.py``). macOS needs nothing: MLX uses Accelerate.
* ``cpu_kernels``: our CPU kernels (quantized matrix-vector products for decoding, the
  bfloat16 GEMM, GELU, depthwise conv, GLUMBConv's gated depthwise conv, SiLU, the normalisations
  with their epilogues, the DiT's softmax and ReLU linear attention cores) and their thread pool.
* ``primitives_ext`` (Linux): those kernels as nodes of MLX's graph (C++ ``Primitive``s,
  ``kernels/native/primitives.cpp``, used by ``kernels/primitives.py``), compiled against the
  headers of the mlx wheel and nanobind's sources (both build requirements), linked to
  ``libmlx`` and to ``cpu_kernels``.

All optional: without a C/C++ compiler the package still installs and MLX's own operations
do the work (MLX's reference BLAS instead of OpenBLAS without the shim).
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "kernels/native"
KERNELS = "mobileo_mlx.kernels.native.cpu_kernels"
PRIMITIVES = "mobileo_mlx.kernels.native.primitives_ext"

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mobileo_mlx.kernels.native.blas_shim",
            sources=[f"{NATIVE}/blas_shim.c"],
            # The scipy_* symbols are left undefined on purpose; they resolve
            # against libscipy_openblas.so, loaded globally first at run time.
            extra_compile_args=["-O2"],
            optional=True,
        )
    )

ext_modules.append(
    Extension(
        KERNELS,
        sources=[f"{NATIVE}/{name}.c" for name in ("quantized_gemv", "dequantize", "bf16_gemm", "gelu", "depthwise",
                                                   "gated_depthwise", "silu", "norms", "attention", "grouped_pointwise",
                                                   "pool")],
        depends=[f"{NATIVE}/pool.h", f"{NATIVE}/vec8.h", f"{NATIVE}/vec16.h", f"{NATIVE}/logistic16.h",
                 f"{NATIVE}/cpu_kernels.h"],
        # no fused multiply-adds: gelu.c, gated_depthwise.c, silu.c and norms.c round as the MLX forms they mirror
        extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
        optional=True,
    )
)


def _primitives_extension() -> Extension | None:
    """The graph nodes, where the build environment has mlx's headers and nanobind."""
    try:
        import nanobind
        from importlib.util import find_spec

        mlx_dir = find_spec("mlx").submodule_search_locations[0]
    except (ImportError, AttributeError, TypeError):
        print("mobileo-mlx: mlx or nanobind missing from the build environment: no graph nodes", file=sys.stderr)
        return None
    if not os.path.isfile(os.path.join(mlx_dir, "include", "mlx", "primitives.h")):
        print("mobileo-mlx: this mlx ships no C++ headers: no graph nodes", file=sys.stderr)
        return None
    nb_dir = os.path.dirname(nanobind.include_dir())
    return Extension(
        PRIMITIVES,
        # nb_combined.cpp: nanobind's runtime, compiled in (its documented non-CMake build)
        sources=[f"{NATIVE}/primitives.cpp", os.path.join(nanobind.source_dir(), "nb_combined.cpp")],
        depends=[f"{NATIVE}/cpu_kernels.h"],
        include_dirs=[nanobind.include_dir(), os.path.join(nb_dir, "ext", "robin_map", "include"),
                      os.path.join(mlx_dir, "include"), NATIVE],
        # NB_DOMAIN=mlx: share mlx.core's nanobind type registry, so mx.array crosses as itself
        define_macros=[("NB_DOMAIN", "mlx"), ("NB_COMPACT_ASSERTIONS", None), ("NDEBUG", None)],
        extra_compile_args=["-std=c++20", "-O2", "-g0", "-fvisibility=hidden", "-fno-strict-aliasing",
                            "-ffunction-sections", "-fdata-sections"],
        library_dirs=[os.path.join(mlx_dir, "lib")],
        libraries=["mlx"],
        # $ORIGIN finds cpu_kernels beside it; libmlx is the one mlx.core loaded (same soname),
        # or, installed in site-packages, mlx/lib three folders up.
        extra_link_args=["-Wl,--gc-sections", "-Wl,-rpath,$ORIGIN", "-Wl,-rpath,$ORIGIN/../../../mlx/lib"],
        language="c++",
        optional=True,
    )


class BuildNative(build_ext):
    """Links the graph nodes to the C kernels built just before them (skipped without them)."""

    def build_extension(self, ext):
        if ext.name == PRIMITIVES:
            kernels = self.get_ext_fullpath(KERNELS)
            if not os.path.isfile(kernels):
                print("mobileo-mlx: the C kernels were not built: no graph nodes", file=sys.stderr)
                return
            ext.library_dirs = [*ext.library_dirs, os.path.dirname(kernels)]
            ext.extra_link_args = [*ext.extra_link_args, f"-l:{os.path.basename(kernels)}"]
        super().build_extension(ext)


if sys.platform.startswith("linux"):
    primitives = _primitives_extension()
    if primitives is not None:
        ext_modules.append(primitives)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildNative})
