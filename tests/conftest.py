"""Shared fixtures. Importing mobileo_mlx first routes MLX's BLAS (before any
test module imports mlx.core)."""

import mobileo_mlx  # noqa: F401  (must stay the first import)

import os  # noqa: E402

# The parity tests hold MLX to float32 references at float32 tolerances, so the suite runs
# with float32 CPU matmuls; the bf16 ones are tested on their own (test_primitives, test_backends and
# the models' bf16 tests).
os.environ.setdefault("MOBILEO_MLX_CPU_MATMUL", "fp32")
