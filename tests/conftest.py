"""Shared fixtures. Importing mobileo_mlx first routes MLX's BLAS (before any
test module imports mlx.core)."""

import mobileo_mlx  # noqa: F401  (must stay the first import)
