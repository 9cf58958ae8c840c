"""Declarative weight-name mapping: one module per component.

Every component module in this package defines

``KEYS``
    a compiled regex that matches the *original* checkpoint names the
    component owns (full names, e.g. ``model.dit.transformer_blocks.0.attn1.to_q.weight``);
``IGNORE``
    a compiled regex (or ``None``) of owned names that are dropped on purpose
    (the DC-AE encoder, FastViT's unused ``head``, ...);
``RULES``
    a tuple of :class:`Rule`: original name -> runtime (MLX parameter) name,
    with the layout transform (PyTorch OIHW convs -> MLX OHWI, ...);
``config_from_checkpoint(shapes, checkpoint_config, diffusers_config)``
    the component's runtime config as a plain JSON-able ``dict``, inferred from
    tensor shapes (``{original_name: shape}``) and the checkpoint's
    ``config.json`` (and, for the DiT/VAE/scheduler, the diffusers config);
``convert(names, get, config)``
    yields ``(runtime_name, float32 ndarray)`` for the component; ``get(name)``
    loads one original tensor as float32 numpy, so conversion streams tensor
    by tensor. Most components use :func:`convert_with_rules`; FastViT folds
    BatchNorms, which needs several tensors at once.

Model code never sees original names: translating them happens here only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]

# Runtime component name -> mapping module name (also the model file name).
COMPONENTS = {
    "vision": "fastvit",
    "projector": "projector",
    "language": "language",
    "mcp": "mcp",
    "dit": "sana",
    "vae": "dcae",
}


def identity(w: np.ndarray) -> np.ndarray:
    return w


def conv2d(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [O, I/g, kh, kw] -> MLX [O, kh, kw, I/g]."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1))


def conv1d(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d weight [O, I/g, k] -> MLX [O, k, I/g]."""
    return np.ascontiguousarray(w.transpose(0, 2, 1))


def pointwise(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv weight [O, I, 1(, 1)] used as a Linear weight [O, I]."""
    return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]))


@dataclass(frozen=True)
class Rule:
    """Map original names matching ``source`` (a full-match regex) to
    ``target`` (an ``re`` replacement template) through ``transform``."""

    source: str
    target: str
    transform: Transform = identity

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", re.compile(self.source))

    def apply(self, name: str) -> str | None:
        match = self._pattern.fullmatch(name)  # type: ignore[attr-defined]
        return match.expand(self.target) if match else None


def map_name(rules: Iterable[Rule], name: str) -> tuple[str, Transform] | None:
    """The runtime name and transform of the first rule that matches ``name``."""
    for rule in rules:
        target = rule.apply(name)
        if target is not None:
            return target, rule.transform
    return None


def convert_with_rules(
    rules: Iterable[Rule], names: Iterable[str], get: Callable[[str], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``names`` through ``rules``; a name no rule knows is an error
    (owned-but-unused names must be excluded through the module's IGNORE)."""
    rules = tuple(rules)
    for name in names:
        mapped = map_name(rules, name)
        if mapped is None:
            raise KeyError(f"no mapping rule for checkpoint tensor {name!r}")
        target, transform = mapped
        yield target, transform(get(name))


def load_component(component: str):
    """The mapping module of a runtime component (``"dit"`` -> ``convert.mapping.sana``)."""
    import importlib

    return importlib.import_module(f"{__name__}.{COMPONENTS[component]}")
