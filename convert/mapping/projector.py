"""mlp2x_gelu projector: ``model.mm_projector.{0,2}`` -> ``linear_{1,2}`` (docs/reference-model.md §1.3, §2.2).

Index 1 of the original ``nn.Sequential`` is the GELU, so it has no tensors.
"""

from __future__ import annotations

import re
from typing import Mapping

from mobileo_mlx.convert.mapping import Rule, convert_with_rules

KEYS = re.compile(r"model\.mm_projector\.")
IGNORE = None

RULES = (
    Rule(r"model\.mm_projector\.0\.(weight|bias)", r"linear_1.\1"),
    Rule(r"model\.mm_projector\.2\.(weight|bias)", r"linear_2.\1"),
)


def config_from_checkpoint(
    shapes: Mapping[str, tuple], checkpoint_config: Mapping, diffusers_config=None
) -> dict:
    """The ``ProjectorConfig`` dict: widths from the two Linear weights."""
    projector_type = checkpoint_config.get("mm_projector_type") or "mlp2x_gelu"
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"unsupported mm_projector_type {projector_type!r} (only mlp2x_gelu)")
    if any(re.match(r"model\.mm_projector\.([13-9]|\d\d)", name) for name in shapes):
        raise ValueError("mlp2x_gelu has Linear layers at indices 0 and 2 only")
    hidden_size, mm_hidden_size = shapes["model.mm_projector.0.weight"]
    if tuple(shapes["model.mm_projector.2.weight"]) != (hidden_size, hidden_size):
        raise ValueError(f"mm_projector.2.weight should be {[hidden_size, hidden_size]}")
    declared = checkpoint_config.get("mm_hidden_size")
    if declared is not None and int(declared) != mm_hidden_size:
        raise ValueError(f"config.json mm_hidden_size {declared} != projector input width {mm_hidden_size}")
    return {
        "mm_hidden_size": int(mm_hidden_size),
        "hidden_size": int(hidden_size),
        "projector_type": projector_type,
    }


def convert(names, get, config):
    return convert_with_rules(RULES, names, get)
