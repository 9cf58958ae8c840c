"""Quantization recipes: which layers of which component are stored quantized.

MLX quantizes ``nn.Linear`` and ``nn.Embedding`` weights (affine, per group of
``group_size`` input values, ``mx.quantize``); convolutions, norms, biases and
tables stay floating point. A recipe maps each eligible layer (its module path
in the built MLX model) to ``{"bits", "group_size"}``; the converter stores
``weight`` (packed uint32), ``scales`` and ``biases`` for those layers and
records the mapping in ``config.json["quantization"]["layers"]``, from which
:func:`mobileo_mlx.weights.quantize_modules` rebuilds the same modules.

Recipes
-------
``none``
    Nothing is quantized; every tensor keeps the source float dtype (bf16 stays
    bf16, fp32 stays fp32, bit for bit).
``8`` / ``4``
    Every eligible Linear / Embedding of every component at 8 / 4 bits, except
    the MCP (see below).
``mixed`` (default; 1.49 GiB for Mobile-O-0.5B, under the 2 GB target: LM 0.49 GB,
    DiT 0.64 GB, VAE decoder 0.21 GB, vision 0.25 GB, projector + MCP 0.01 GB)
    * language: decoder linears 4-bit (358 M params, the bulk; the iOS app ships
      the LM at 4 bits too), token embedding and ``lm_head`` 8-bit: errors in
      the embedding enter every layer and the head picks the tokens, so they
      get the finer grid (136 M params each, 8-bit costs 145 MB apiece).
    * dit: the transformer-block linears (attention, cross-attention and the
      GLUMBConv pointwise projections, 578 M params) 8-bit: image quality is
      more sensitive than text to weight noise, and 8-bit keeps the DiT at
      ~0.6 GB. The timestep / caption embedders and ``proj_out`` (small, and
      each feeds every block or the output) keep the source precision.
    * vae: its Linear layers 8-bit; its convolutions (most of the decoder) keep
      the source precision, MLX cannot quantize convolutions.
    * vision (FastViT: mostly convolutions) and projector (3.6 M params) keep
      the source precision: every image feature passes through them.
    * mcp: never quantized (2.4 M params that condition every DiT step).

Quantization is about memory and download size. At run time on CPU, every
layer computes in float32 (``mobileo_mlx.backends.cpu.quantized``): a quantized layer pays for
dequantizing its weight at each call, so ``none`` is the fastest recipe there
when memory allows (it needs ~6 GB once cast to float32).

Layers whose input width is not a multiple of ``group_size`` are left
unquantized. Unquantized tensors always keep the source float dtype; scales
and biases are stored in float16 for 16-bit sources and float32 otherwise.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

RECIPES = ("none", "8", "4", "mixed")
DEFAULT_RECIPE = "mixed"
DEFAULT_GROUP_SIZE = 64
GROUP_SIZES = (32, 64, 128)

NEVER_QUANTIZED = frozenset({"mcp"})

# mixed: component -> ordered (module-path regex, bits); the first match wins,
# no match means "keep the source precision".
MIXED_RULES: dict[str, tuple[tuple[str, int], ...]] = {
    "language": ((r"(.*\.)?(embed_tokens|lm_head)", 8), (r".*", 4)),
    "dit": ((r"transformer_blocks\.\d+\..*", 8),),
    "vae": ((r".*", 8),),
}


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> Linear / Embedding leaf of ``model``."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {path: module for path, module in leaves if isinstance(module, (nn.Linear, nn.Embedding))}


def _bits_for(recipe: str, component: str, path: str) -> int | None:
    if recipe == "none" or component in NEVER_QUANTIZED:
        return None
    if recipe in ("8", "4"):
        return int(recipe)
    for pattern, bits in MIXED_RULES.get(component, ()):
        if re.fullmatch(pattern, path):
            return bits
    return None


def plan_layers(component: str, model: nn.Module, recipe: str, group_size: int) -> dict[str, dict]:
    """``{module_path: {"bits": b, "group_size": g}}`` for the layers ``recipe`` quantizes."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, not {group_size}")
    layers = {}
    for path, module in quantizable_layers(model).items():
        bits = _bits_for(recipe, component, path)
        if bits is None or module.weight.shape[-1] % group_size:
            continue
        layers[path] = {"bits": bits, "group_size": group_size}
    return layers


QUANTIZE_ROWS_ELEMENTS = 1 << 22  # values per quantization call (bounds MLX temporaries)


def quantize_rows(values: np.ndarray, bits: int, group_size: int):
    """Quantize float32 ``values`` [out, in] a block of rows at a time; yields
    ``(first_row, packed uint32, scales, biases)`` (scales/biases float32)."""
    rows_per_block = max(1, QUANTIZE_ROWS_ELEMENTS // max(1, values.shape[-1]))
    for first in range(0, values.shape[0], rows_per_block):
        block = mx.array(values[first : first + rows_per_block], dtype=mx.float32)
        packed, scales, biases = mx.quantize(block, group_size=group_size, bits=bits)
        mx.eval(packed, scales, biases)
        yield first, np.array(packed), np.array(scales), np.array(biases)
        del block, packed, scales, biases
    mx.clear_cache()
