"""Checkpoint conversion: `python -m convert.from_torch CHECKPOINT`.

Importing mobileo_mlx first routes MLX's CPU BLAS before mlx.core loads.
"""

import mobileo_mlx  # noqa: F401  (BLAS routing side effect)
