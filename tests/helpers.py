"""Test helpers shared by the parity tests.

``convert_state_dict`` sends a PyTorch reference model's state dict, under the
*original checkpoint's* key names, through the converter's mapping for one
component, exactly as ``python -m convert.from_torch`` does, and returns the
runtime config and MLX weights.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import numpy as np

from mobileo_mlx import backends
from mobileo_mlx.convert.mapping import load_component

# Copies of the released checkpoint's files (keys_full.txt, checkpoint_config.json, the diffusers configs).
REFERENCE_DIR = Path(__file__).resolve().parent / "data"


def reference_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the released checkpoint: name -> (shape, dtype), from keys_full.txt."""
    keys = {}
    for line in (REFERENCE_DIR / "keys_full.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(d) for d in shape.strip("[]").split(",") if d.strip()), dtype)
    return keys


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any float dtype) or array as float32 numpy."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


def convert_state_dict(
    component: str,
    state_dict: Mapping[str, object],
    checkpoint_config: dict | None = None,
    diffusers_config: dict | None = None,
) -> tuple[dict, dict[str, mx.array]]:
    """(runtime config, runtime weights) for ``component`` from original-named tensors."""
    mapping = load_component(component)
    owned = [k for k in state_dict if mapping.KEYS.match(k)]
    if mapping.IGNORE is not None:
        owned = [k for k in owned if not mapping.IGNORE.match(k)]
    shapes = {k: tuple(state_dict[k].shape) for k in owned}
    config = mapping.config_from_checkpoint(shapes, checkpoint_config or {}, diffusers_config)
    arrays = {
        name: mx.array(value)
        for name, value in mapping.convert(owned, lambda k: to_numpy(state_dict[k]), config)
    }
    return config, arrays


# The parity tests run each model twice: plain, and with the backend's forms swapped in.
SEAMS = ("plain", "accelerated")


def seamed(model, component: str, seam: str, matmul: str = "fp32"):
    """``model`` plain, or made fast for the current backend (``backends.accelerate``, in place)."""
    return backends.accelerate(model, component, matmul=matmul) if seam == "accelerated" else model


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB, with a few bytes of (bad) data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
