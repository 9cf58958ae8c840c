"""Loading converted folders, and the precision policy.

A converted folder (written by ``python -m convert.from_torch``) holds
``config.json`` (``"format": "mobileo-mlx"``, one section per component, the
quantized layers per component), one ``<component>.safetensors`` per component
in MLX layouts, and ``tokenizer.json``.

:func:`check_folder` checks one cheaply, from headers and sizes: its config
key by key (:func:`check_config`: a null section, a wrong type or a size below
1 is named, never met later as a traceback) and every safetensors header
(:func:`safetensors_entries`, which the converter uses on checkpoints too).

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

Components load on demand (:class:`ConvertedModel`); each is read and cast
once, when it is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import re
import struct
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mobileo_mlx.kernels import quantized_gemv as native_gemv

from . import platform
from .errors import WeightsError
from .models import MODELS, build

FORMAT = "mobileo-mlx"
FORMAT_VERSION = 1
COMPONENTS = tuple(MODELS)  # vision, projector, language, mcp, dit, vae
CONFIG_SECTIONS = COMPONENTS + ("scheduler",)


# ---------------------------------------------------------------------------
# quantized layers that compute in floating point

# Up to this many input rows (tokens), a quantized layer multiplies the packed weight
# directly: the native CPU kernel (kernels.quantized_gemv; LM head 151936x896 8-bit, one
# row: 7 ms), or without it quantized_matmul (0.10 s); above it, dequantize + ordinary
# matmul. Measured on CPU (MLX 0.32, OpenBLAS), quantized_matmul against dequantize +
# sgemm for that head: 1 row 0.10 s vs 1.2 s, 16 rows 1.65 s vs 1.25 s, 256 rows 27 s vs
# 1.9 s; the crossover is near 10 rows for every layer shape tried. The native kernel
# keeps one accumulator per row in registers, hence its limit of 8 rows too.
QUANTIZED_MATMUL_MAX_ROWS = 8


def _unpack_affine(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """``mx.dequantize`` for affine quantization, written with element-wise ops
    so that ``mx.compile`` fuses them: 2-3x faster on CPU, bit-identical.
    MLX packs values from the lowest bits up, so on little-endian machines
    8-bit values are the packed bytes and 4-bit ones their low then high nibbles."""
    if bits in (4, 8) and sys.byteorder == "little":
        values = mx.view(packed, mx.uint8)
        if bits == 4:
            values = mx.stack([values & 0xF, values >> 4], axis=-1)
    else:
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*packed.shape[:-1], -1, group_size).astype(scales.dtype)
    return (values * scales[..., None] + biases[..., None]).reshape(*packed.shape[:-1], -1)


_UNPACKERS: dict[tuple[int, int], object] = {}


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """Affine dequantization (compiled once per bits / group size)."""
    if 32 % bits:  # 3, 5, 6 bits straddle words: MLX's own kernel
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    unpack = _UNPACKERS.get((bits, group_size))
    if unpack is None:
        unpack = _UNPACKERS[(bits, group_size)] = mx.compile(
            lambda p, s, b: _unpack_affine(p, s, b, bits, group_size)
        )
    return unpack(packed, scales, biases)


# ---------------------------------------------------------------------------
# K-major storage of 8-bit weights (CPU, components that always multiply many rows)
#
# MLX's layout keeps each output row's bytes together, [out, K], with one scale per 64
# of them: dequantizing broadcasts every scale along the innermost axis, which MLX's CPU
# kernels do slowly. Stored K-major, [K, out] bytes and [K / 64, out] scales, the scales
# broadcast along an outer axis instead: 0.67 -> 0.37 ns a weight (a SANA-600M step's
# 576 M weights: 0.39 -> 0.23 s), bit-identical, and the GEMM x @ W runs as fast. Only for
# components whose layers never see a handful of rows (no quantized_matmul, which needs
# MLX's layout): the DiT and the VAE decoder. Transposed once, at load.
K_MAJOR_COMPONENTS = ("dit", "vae")


@functools.lru_cache(maxsize=None)
def _k_major_unpacker(group_size: int):
    def unpack(values: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        groups, outputs = scales.shape
        grouped = values.reshape(groups, group_size, outputs).astype(scales.dtype)
        return (grouped * scales[:, None, :] + biases[:, None, :]).reshape(groups * group_size, outputs)

    return mx.compile(unpack)


def _dequantize_k_major(values: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """W.T [K, out] from K-major 8-bit values [K, out] (uint8), scales and biases [K / group_size, out]."""
    return _k_major_unpacker(group_size)(values, scales, biases)


def use_k_major(model: nn.Module) -> int:
    """Store the model's 8-bit :class:`DequantizedLinear` layers K-major (see above), one
    layer at a time (the transient copy is one layer). Returns how many were converted."""
    if sys.byteorder != "little":
        return 0
    converted = 0
    for _, layer in model.named_modules():
        if not isinstance(layer, DequantizedLinear) or layer.bits != 8 or layer.k_major:
            continue
        values = mx.contiguous(mx.view(layer["weight"], mx.uint8).T)
        scales, biases = mx.contiguous(layer["scales"].T), mx.contiguous(layer["biases"].T)
        mx.eval(values, scales, biases)
        layer.update({"weight": values, "scales": scales, "biases": biases})
        layer.k_major = True
        converted += 1
    return converted


# quantized_matmul runs on one CPU thread. For a large layer its output columns are split
# in two halves, one per CPU stream (platform.cpu_pieces; MLX runs each stream on its own
# thread): measured 1.9x faster on 2 cores (LM head 151649x896 8-bit, one row:
# 117 -> 60 ms; 4864x896 and 896x4864 4-bit: 3.8 -> 2.0 ms). Same products, same result.
SPLIT_MIN_WEIGHTS = 1 << 19

# With few rows the dequantization costs as much as the GEMM (a 4-bit weight: ~1 ns to
# dequantize, 2 * rows flops to multiply): up to this many rows the two halves of the
# weight are dequantized on the two CPU streams, then multiplied. LM prefill, 79 tokens:
# 0.83 -> 0.72 s; 308 tokens: 2.27 -> 2.14 s. With more rows the GEMM dominates and the
# join costs what the split saves (a CFG DiT step: no gain).
SPLIT_DEQUANTIZE_MAX_ROWS = 320


def _quantized_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, layer) -> mx.array:
    return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=layer.group_size,
                               bits=layer.bits)


def _quantized_product(x: mx.array, layer: nn.Module) -> mx.array:
    """``x @ W.T`` for a quantized ``W`` held by ``layer``."""
    if getattr(layer, "k_major", False):
        return x @ _dequantize_k_major(layer["weight"], layer["scales"], layer["biases"], layer.group_size).astype(x.dtype)
    packed, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    rows = x.size // max(1, x.shape[-1])
    if rows <= QUANTIZED_MATMUL_MAX_ROWS and native_gemv.supported(x, packed, scales, biases, layer.bits,
                                                                   layer.group_size):
        # The CPU kernel (kernels/native/quantized_gemv.c): all cores, ~20x MLX's loop.
        return native_gemv.quantized_gemv(x, packed, scales, biases, layer.bits, layer.group_size)
    outputs = packed.shape[0]
    split = (outputs * packed.shape[1] * 32 // layer.bits >= SPLIT_MIN_WEIGHTS and outputs >= 2
             and platform.may_split_over_streams())
    half = outputs // 2
    halves = (slice(0, half), slice(half, outputs))
    if rows <= QUANTIZED_MATMUL_MAX_ROWS:
        if not split:
            return _quantized_matmul(x, packed, scales, biases, layer)
        return mx.concatenate(platform.cpu_pieces(2, lambda i: _quantized_matmul(
            x, packed[halves[i]], scales[halves[i]], biases[halves[i]], layer)), axis=-1)
    if not split or rows > SPLIT_DEQUANTIZE_MAX_ROWS:
        weight = dequantize(packed, scales, biases, layer.bits, layer.group_size)
        return x @ weight.astype(x.dtype).T
    # Not before the input is ready: a helper stream free to run ahead would dequantize
    # every layer of the model at once (all of it in float32 in memory).
    packed, scales, biases = mx.depends([packed, scales, biases], [x])
    first, second = platform.cpu_pieces(2, lambda i: dequantize(
        packed[halves[i]], scales[halves[i]], biases[halves[i]], layer.bits, layer.group_size).astype(x.dtype))
    # Both halves before the first GEMM: OpenBLAS splits a GEMM statically between its
    # threads, so a core still busy dequantizing would stall the whole product.
    first = mx.depends(first, second)
    return mx.concatenate([x @ first.T, x @ second.T], axis=-1)


class DequantizedLinear(nn.Module):
    """A Linear layer with affine-quantized storage that multiplies in floating
    point: the weight is dequantized on the fly and the product is an ordinary
    (sgemm) matmul, far faster on CPU than ``quantized_matmul`` except for a
    handful of rows (token-by-token decoding), where the native CPU kernel
    ``kernels.quantized_gemv`` (or, without it, ``quantized_matmul``) is used
    (see ``QUANTIZED_MATMUL_MAX_ROWS``)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.k_major = False  # MLX's layout; use_k_major() transposes 8-bit storage
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_product(x, self)
        return y + self["bias"] if "bias" in self else y

    def _extra_repr(self) -> str:
        if self.k_major:
            in_dims, out_dims = self.weight.shape
        else:
            out_dims, packed = self.weight.shape
            in_dims = packed * 32 // self.bits
        layout = ", k_major" if self.k_major else ""
        return f"input_dims={in_dims}, output_dims={out_dims}, bits={self.bits}, group_size={self.group_size}{layout}"


class DequantizedEmbedding(nn.Module):
    """An Embedding with affine-quantized storage: looked-up rows are
    dequantized; :meth:`as_linear` (tied heads) works as :class:`DequantizedLinear`."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((num_embeddings, dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((num_embeddings, dims // group_size))
        self.biases = mx.zeros((num_embeddings, dims // group_size))
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        return dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids], self.bits, self.group_size)

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_product(x, self)


def quantize_modules(model: nn.Module, layers: Mapping[str, Mapping], dequantize_on_the_fly: bool) -> nn.Module:
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
                return DequantizedEmbedding(count, dims, group_size, bits)
            return nn.QuantizedEmbedding(count, dims, group_size, bits)
        raise WeightsError(f"config.json quantizes {path}, which is a {type(module).__name__}, not a Linear/Embedding")

    leaves = tree_map_with_path(replace, model.leaf_modules(), is_leaf=nn.Module.is_module)
    missing = sorted(set(layers) - found)
    if missing:
        raise WeightsError(f"config.json quantizes layers the model does not have: {', '.join(missing[:5])}")
    model.update_modules(leaves)
    return model


# ---------------------------------------------------------------------------
# safetensors headers: read without touching the tensor data (the converter's source
# reader and the validation of converted folders share this)

# safetensors dtype -> bytes per value (the format's table)
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_entries(path: str | Path, error: type[Exception] = WeightsError) -> dict[str, SafetensorsEntry]:
    """The tensors of a safetensors file, from its header alone, after the format's checks:
    the header is a JSON object of well-formed entries, every dtype is known, every tensor's
    byte count is its shape times its dtype's size, and the tensors' byte ranges neither
    overlap nor leave gaps and cover the data section exactly (so the file is as long as its
    header says). Any violation raises ``error`` (one line naming the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise error(
                    f"{path} is truncated or not a safetensors file (header of {header_len} bytes, file of {size})"
                )
            if header_len > SAFETENSORS_MAX_HEADER:
                raise error(f"{path} is not a safetensors file (header of {header_len} bytes)")
            raw = f.read(header_len)
    except OSError as failure:
        raise error(f"cannot read {path}: {failure.strerror or failure}") from None
    corrupt = f"{path} is corrupt:"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as duplicate:
        raise error(f"{corrupt} {str(duplicate)!r} appears twice in its header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as failure:
        reason = str(failure).splitlines()[0][:80] if str(failure) else type(failure).__name__
        raise error(f"{corrupt} its safetensors header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise error(f"{corrupt} its safetensors header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries: dict[str, SafetensorsEntry] = {}
    for name, entry in header.items():
        if name == "__metadata__":  # optional: null (as MLX writes it) or strings
            strings = isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            if entry is not None and not strings:
                raise error(f"{corrupt} its __metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict):
            raise error(f"{corrupt} bad header entry for {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise error(f"{corrupt} tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise error(f"{corrupt} tensor {name!r} has a bad shape {shape!r}"[:300])
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(v) for v in offsets)
                or offsets[0] > offsets[1]):
            raise error(f"{corrupt} tensor {name!r} has bad data_offsets {offsets!r}"[:300])
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if end - begin != expected:
            raise error(
                f"{corrupt} tensor {name!r} {shape} {dtype} spans {end - begin} bytes, expected {expected}"[:300]
            )
        if end > data_size:
            raise error(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}")
        entries[name] = SafetensorsEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    covered, previous = data_start, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < covered:
            raise error(f"{corrupt} tensors {previous!r} and {entry.name!r} overlap")
        if entry.start > covered:
            raise error(f"{corrupt} {entry.start - covered} bytes before tensor {entry.name!r} belong to no tensor")
        covered, previous = entry.end, entry.name
    if covered != size:
        raise error(f"{corrupt} its last {size - covered} bytes belong to no tensor")
    return entries


# ---------------------------------------------------------------------------
# converted folders

# Every int of a component's config (a size, a count, a kernel, an id) must be >= 1, but these.
_MAY_BE_ZERO = {"bos_token_id", "eos_token_id", "layers_per_block"}
# Fields the DC-AE's config types only as ``tuple``: what they hold.
_FIELD_TYPES = {
    "block_out_channels": list[int],
    "layers_per_block": list[int],
    "qkv_multiscales": list[list[int]],
    "block_types": Union[str, list[str]],
    "norm_types": Union[str, list[str]],
    "act_fns": Union[str, list[str]],
}
# What MLX's affine quantization supports.
_QUANTIZATION_BITS = (2, 3, 4, 5, 6, 8)
_QUANTIZATION_GROUP_SIZES = (32, 64, 128)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_list_type(kind) -> bool:
    return kind in (list, tuple) or typing.get_origin(kind) in (list, tuple)


def _value_problem(key: str, value, kind) -> str | None:
    """Why ``value`` does not fit the type annotation ``kind`` (None if it does); ``key``
    names it in the message and sets its bounds."""
    field = key.split(".")[-1].split("[")[0]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return None
    if origin is Union or isinstance(kind, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        # Judge the value by the arm of its own kind (a list by List[int], a number by int).
        matching = [arm for arm in arms if _is_list_type(arm) == isinstance(value, list)]
        return _value_problem(key, value, (matching or arms)[0])
    if kind is bool:
        return None if isinstance(value, bool) else f"{key} must be true or false, not {_show(value)}"
    if kind is int:
        least = 0 if field in _MAY_BE_ZERO else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"{key} must be an integer >= {least}, not {_show(value)}"
        return None
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
            return f"{key} must be a number > 0, not {_show(value)}"
        return None
    if kind is str:
        return None if isinstance(value, str) else f"{key} must be a string, not {_show(value)}"
    if _is_list_type(kind):
        if not isinstance(value, list):
            return f"{key} must be a list, not {_show(value)}"
        item = args[0] if args else typing.Any
        for index, element in enumerate(value):
            problem = _value_problem(f"{key}[{index}]", element, item)
            if problem:
                return problem
        return None
    if origin is dict or kind is dict:
        return None if isinstance(value, dict) else f"{key} must be an object, not {_show(value)}"
    return None


@functools.lru_cache(maxsize=None)
def _config_class(section: str):
    if section == "scheduler":
        from .samplers import SchedulerConfig

        return SchedulerConfig
    module_name, _, class_name = MODELS[section]
    return getattr(importlib.import_module(f"{__package__}.models.{module_name}"), class_name)


def config_problem(section: str, values, own_checks: bool = True) -> str | None:
    """Why ``values`` cannot be the ``section`` part of a converted config.json (a component
    or the scheduler), naming the key; None when it can. Keys absent take the defaults.
    ``own_checks`` adds the config class's own checks (one entry per stage, ...)."""
    if not isinstance(values, dict):
        return f"{section!r} must be an object, not {_show(values)}"
    config_class = _config_class(section)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in values:
            problem = _value_problem(f"{section}.{field.name}", values[field.name],
                                     _FIELD_TYPES.get(field.name, hints[field.name]))
            if problem:
                return problem
    if section == "language":
        defaults = config_class()
        hidden = values.get("hidden_size", defaults.hidden_size)
        heads = values.get("num_attention_heads", defaults.num_attention_heads)
        kv_heads = values.get("num_key_value_heads", defaults.num_key_value_heads)
        if hidden % heads:
            return f"language.hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        if heads % kv_heads:
            return f"language.num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    if section == "vae":
        stages = len(values.get("block_out_channels", config_class.block_out_channels))
        for key in ("block_types", "layers_per_block", "qkv_multiscales", "norm_types", "act_fns"):
            if isinstance(values.get(key), list) and len(values[key]) != stages:
                return f"vae.{key} has {len(values[key])} entries, block_out_channels {stages}: one per stage"
    if not own_checks:
        return None
    failures = (ValueError, TypeError, KeyError, IndexError, ArithmeticError)
    try:  # the config classes' own checks (one entry per stage, supported options, ...)
        config_class.from_dict(values)
    except failures as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # Name the key whose default would pass, if there is one.
        for key in values:
            try:
                config_class.from_dict({k: v for k, v in values.items() if k != key})
            except failures:
                continue
            return f"{section}.{key}: {reason}"
        return f"{section}: {reason}"
    return None


def _quantization_problem(quantization) -> str | None:
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        return f"'quantization' must be an object, not {_show(quantization)}"
    layers = quantization.get("layers") or {}
    if not isinstance(layers, dict):
        return f"quantization.layers must be an object, not {_show(layers)}"
    for component, specs in layers.items():
        if component not in COMPONENTS:
            return f"quantization.layers names an unknown component {component!r}"
        if not isinstance(specs, dict):
            return f"quantization.layers.{component} must be an object, not {_show(specs)}"
        for path, spec in specs.items():
            where = f"quantization.layers.{component}.{path}"
            if not isinstance(spec, dict):
                return f"{where} must be an object, not {_show(spec)}"
            for key, allowed in (("bits", _QUANTIZATION_BITS), ("group_size", _QUANTIZATION_GROUP_SIZES)):
                value = spec.get(key)
                if value not in allowed or isinstance(value, (bool, float)):
                    return f"{where}.{key} must be one of {', '.join(map(str, allowed))}, not {_show(value)}"
    return None


def check_config(config: dict, path: Path) -> None:
    """Raise WeightsError naming the first key of a converted ``config`` that the runtime
    cannot use (a missing or null section, a wrong type, a size below 1, ...)."""
    for section in CONFIG_SECTIONS:
        if section not in config:
            raise WeightsError(f"{path} has no {section!r} section")
        problem = config_problem(section, config[section])
        if problem:
            raise WeightsError(f"{path}: {problem}")
    problem = _quantization_problem(config.get("quantization"))
    if problem:
        raise WeightsError(f"{path}: {problem}")


def read_config(folder: str | Path) -> dict:
    """The converted folder's config.json, checked (:func:`check_config`); raises
    WeightsError if it is not one or cannot be used."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"not a converted mobileo-mlx folder (no config.json): {folder}") from None
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise WeightsError(f"not a converted mobileo-mlx folder ({path} lacks \"format\": \"{FORMAT}\")")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightsError(f"{path}: format_version must be an integer, not {_show(version)}")
    if version > FORMAT_VERSION:
        raise WeightsError(f"{folder} was written by a newer mobileo-mlx (format {version}); upgrade to load it")
    check_config(config, path)
    return config


# The converter's mark in config.json (its first key). Read from the raw text, so that a
# folder whose config.json was truncated or hand-broken is still known as a converted one.
_FORMAT_MARK = re.compile(rb'"format"\s*:\s*"' + FORMAT.encode() + rb'"')


def is_converted_folder(folder: str | Path) -> bool:
    """Whether ``folder`` was written by the converter (its config.json carries the format
    mark), whether or not it is intact: :func:`check_folder` says that."""
    try:
        with open(Path(folder) / "config.json", "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return bool(_FORMAT_MARK.search(head))


def check_folder(folder: str | Path) -> dict:
    """Check a converted folder cheaply (headers and sizes, no tensor data is read): its
    config.json (:func:`read_config`), every component's safetensors file
    (:func:`safetensors_entries`) and tokenizer.json. Returns the config; raises WeightsError
    naming the first problem."""
    folder = Path(folder)
    config = read_config(folder)
    for component in COMPONENTS:
        file = folder / f"{component}.safetensors"
        if not file.is_file():
            raise WeightsError(f"{file} is missing")
        safetensors_entries(file)
    tokenizer = folder / "tokenizer.json"
    try:
        if not isinstance(json.loads(tokenizer.read_bytes()), dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise WeightsError(f"{tokenizer} is missing") from None
    except (OSError, ValueError) as error:
        raise WeightsError(f"{tokenizer} is unreadable: {str(error).splitlines()[0][:80]}") from None
    return config


def quantized_layers(config: Mapping, component: str) -> dict[str, dict]:
    return dict(((config.get("quantization") or {}).get("layers") or {}).get(component) or {})


def load_component(
    folder: str | Path,
    component: str,
    dtype: mx.Dtype | None = None,
    config: dict | None = None,
    materialize: bool = True,
):
    """Build ``component``'s MLX module from the folder's config and load its
    weights, with strict name and shape checks.

    ``mx.load`` maps the file lazily. With ``materialize`` (the default) the
    weights are then read and cast once, here: left lazy, every forward pass
    would read the file and cast again (measured on the full LM: 7.7 s per
    forward instead of 0.34 s).
    """
    folder = Path(folder)
    config = config if config is not None else read_config(folder)
    if component not in COMPONENTS:
        raise WeightsError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if component not in config:
        raise WeightsError(f"{folder / 'config.json'} has no {component!r} section")
    dtype = dtype or platform.compute_dtype()
    try:
        model = build(component, config[component])
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(f"{folder / 'config.json'}: cannot build the {component} model: {reason}") from None
    layers = quantized_layers(config, component)
    quantize_modules(model, layers, dequantize_on_the_fly=platform.backend() == "cpu")

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
    del cast, weights  # the file's arrays: the K-major copies below must not coexist with them
    model.eval()
    if materialize:
        mx.eval(model.parameters())
        if component in K_MAJOR_COMPONENTS and platform.backend() == "cpu":
            use_k_major(model)
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
