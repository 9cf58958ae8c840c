"""Loading converted folders, and the precision policy.

A converted folder (written by ``python -m convert.from_torch``) holds
``config.json`` (``"format": "mobileo-mlx"``, one section per component, the
quantized layers per component), one ``<component>.safetensors`` per component
in MLX layouts, and ``tokenizer.json``.

Precision policy
----------------
* The compute dtype is :func:`mobileo_mlx.platform.compute_dtype` (float32 on
  CPU, float16 on GPUs) unless the caller passes ``dtype``; floating-point
  weights are cast to it.
* Quantized layers keep their packed storage (memory is the point). On GPUs
  they are MLX's ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding``. On CPU,
  ``quantized_matmul`` is a slow scalar loop, so they are
  :class:`DequantizedLinear` / :class:`DequantizedEmbedding`: dequantize the
  weight on the fly, then an ordinary (sgemm) matmul.

``mx.load`` is lazy: tensors are read from the file when first evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import platform
from .models import MODELS, build

FORMAT = "mobileo-mlx"
FORMAT_VERSION = 1
COMPONENTS = tuple(MODELS)  # vision, projector, language, mcp, dit, vae
CONFIG_SECTIONS = COMPONENTS + ("scheduler",)


class WeightsError(ValueError):
    """A converted folder that cannot be loaded (one line)."""


# ---------------------------------------------------------------------------
# quantized layers that compute in floating point


class DequantizedLinear(nn.Module):
    """A Linear layer with affine-quantized storage whose matmul runs in the
    input's dtype: ``x @ dequantize(W).T + b``. On CPU this is an sgemm, far
    faster than ``quantized_matmul``."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def dequantized_weight(self, dtype: mx.Dtype) -> mx.array:
        return mx.dequantize(
            self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
        ).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.dequantized_weight(x.dtype)
        if "bias" in self:
            return mx.addmm(self["bias"].astype(x.dtype), x, weight.T)
        return x @ weight.T

    def _extra_repr(self) -> str:
        out_dims, packed = self.weight.shape
        return f"input_dims={packed * 32 // self.bits}, output_dims={out_dims}, bits={self.bits}, group_size={self.group_size}"


class DequantizedEmbedding(nn.Module):
    """An Embedding with affine-quantized storage: rows are dequantized after
    the lookup; :meth:`as_linear` (tied heads) dequantizes, then matmuls."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.group_size, self.bits, self.dtype = group_size, bits, dtype
        self.weight = mx.zeros((num_embeddings, dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((num_embeddings, dims // group_size))
        self.biases = mx.zeros((num_embeddings, dims // group_size))
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        rows = mx.dequantize(
            self["weight"][ids], self["scales"][ids], self["biases"][ids], group_size=self.group_size, bits=self.bits
        )
        return rows.astype(self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        weight = mx.dequantize(
            self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
        ).astype(x.dtype)
        return x @ weight.T


def quantize_modules(
    model: nn.Module,
    layers: Mapping[str, Mapping],
    dequantize_on_the_fly: bool,
    dtype: mx.Dtype = mx.float32,
) -> nn.Module:
    """Replace the Linear / Embedding leaves named in ``layers``
    (``{path: {"bits", "group_size"}}``) by quantized ones, in place.

    ``dequantize_on_the_fly`` picks :class:`DequantizedLinear` /
    :class:`DequantizedEmbedding` (CPU) over MLX's quantized modules (GPU).
    The new modules hold placeholder arrays until weights are loaded.
    """
    found: set[str] = set()

    def replace(path: str, module: nn.Module) -> nn.Module:
        spec = layers.get(path)
        if spec is None:
            return module
        found.add(path)
        bits, group_size = int(spec["bits"]), int(spec["group_size"])
        if isinstance(module, nn.Linear):
            out_dims, in_dims = module.weight.shape
            if dequantize_on_the_fly:
                return DequantizedLinear(in_dims, out_dims, "bias" in module, group_size, bits)
            return nn.QuantizedLinear(in_dims, out_dims, "bias" in module, group_size, bits)
        if isinstance(module, nn.Embedding):
            count, dims = module.weight.shape
            if dequantize_on_the_fly:
                return DequantizedEmbedding(count, dims, group_size, bits, dtype)
            return nn.QuantizedEmbedding(count, dims, group_size, bits)
        raise WeightsError(f"config.json quantizes {path}, which is a {type(module).__name__}, not a Linear/Embedding")

    leaves = tree_map_with_path(replace, model.leaf_modules(), is_leaf=nn.Module.is_module)
    missing = sorted(set(layers) - found)
    if missing:
        raise WeightsError(f"config.json quantizes layers the model does not have: {', '.join(missing[:5])}")
    model.update_modules(leaves)
    return model


# ---------------------------------------------------------------------------
# converted folders


def read_config(folder: str | Path) -> dict:
    """The converted folder's config.json; raises WeightsError if it is not one."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"not a converted mobileo-mlx folder (no config.json): {folder}") from None
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise WeightsError(f"not a converted mobileo-mlx folder ({path} lacks \"format\": \"{FORMAT}\")")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(
            f"{folder} was written by a newer mobileo-mlx (format {config['format_version']}); upgrade to load it"
        )
    return config


def is_converted_folder(folder: str | Path) -> bool:
    try:
        read_config(folder)
        return True
    except WeightsError:
        return False


def quantized_layers(config: Mapping, component: str) -> dict[str, dict]:
    return dict(((config.get("quantization") or {}).get("layers") or {}).get(component) or {})


def load_component(folder: str | Path, component: str, dtype: mx.Dtype | None = None, config: dict | None = None):
    """Build ``component``'s MLX module from the folder's config and load its
    weights (lazily, with strict name and shape checks)."""
    folder = Path(folder)
    config = config if config is not None else read_config(folder)
    if component not in COMPONENTS:
        raise WeightsError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if component not in config:
        raise WeightsError(f"{folder / 'config.json'} has no {component!r} section")
    dtype = dtype or platform.compute_dtype()
    model = build(component, config[component])
    layers = quantized_layers(config, component)
    quantize_modules(model, layers, dequantize_on_the_fly=platform.backend() == "cpu", dtype=dtype)

    file = folder / f"{component}.safetensors"
    if not file.is_file():
        raise WeightsError(f"{file} is missing")
    try:
        weights = mx.load(str(file))
    except Exception as error:  # MLX raises RuntimeError / ValueError for bad files
        raise WeightsError(f"cannot read {file}: {error}") from None

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise WeightsError(f"{file.name} does not match the {component} model: {'; '.join(parts)}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{file.name}: {name} has shape {tuple(value.shape)}, the {component} model expects {tuple(expected[name].shape)}"
            )
    cast = [
        (name, value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value)
        for name, value in weights.items()
    ]
    model.load_weights(cast, strict=True)
    model.eval()
    return model


class ConvertedModel:
    """A converted folder: its config, tokenizer path and lazily loaded components.

    >>> converted = load_folder("mobileo-mlx-0.5b")
    >>> dit = converted["dit"]              # built and loaded on first access
    """

    def __init__(self, folder: str | Path, dtype: mx.Dtype | None = None):
        self.path = Path(folder)
        self.config = read_config(self.path)
        self.dtype = dtype or platform.compute_dtype()
        self._modules: dict[str, nn.Module] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c in self.config)

    @property
    def quantization(self) -> dict:
        return dict(self.config.get("quantization") or {})

    def component(self, name: str) -> nn.Module:
        if name not in self._modules:
            self._modules[name] = load_component(self.path, name, self.dtype, config=self.config)
        return self._modules[name]

    __getitem__ = component

    def release(self, *names: str) -> None:
        """Forget loaded components (all when no name is given)."""
        for name in names or tuple(self._modules):
            self._modules.pop(name, None)
        mx.clear_cache()

    def __repr__(self) -> str:
        recipe = self.quantization.get("recipe", "none")
        return f"ConvertedModel({str(self.path)!r}, quantization={recipe!r}, loaded={sorted(self._modules)})"


def load_folder(folder: str | Path, dtype: mx.Dtype | None = None) -> ConvertedModel:
    return ConvertedModel(folder, dtype)
