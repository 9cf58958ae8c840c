"""Custom kernels beside their plain-MLX twins, dispatched by backend at run time."""

import mobileo_mlx  # noqa: F401  (BLAS routing side effect, before mlx.core loads)
