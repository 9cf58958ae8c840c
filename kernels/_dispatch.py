"""Run-time choice between a custom Metal kernel and its plain-MLX twin."""

from __future__ import annotations

import os

from mobileo_mlx import platform

ENV = "MOBILEO_MLX_KERNELS"
MODES = ("auto", "twin", "reference")


def mode() -> str:
    """``$MOBILEO_MLX_KERNELS``: ``auto`` (default: the Metal kernel on Metal, the twin elsewhere),
    ``twin`` (force the plain-MLX twin, e.g. to compare on a Mac) or ``reference`` (force the
    plainest MLX ops, ``mx.conv2d`` / the unfused graph, on every backend)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def use_metal() -> bool:
    """True when the custom Metal kernels should run: Metal backend and mode ``auto``."""
    return mode() == "auto" and platform.backend() == "metal"


def on_cpu() -> bool:
    return platform.backend() == "cpu"
