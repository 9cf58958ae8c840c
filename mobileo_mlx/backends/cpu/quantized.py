"""CPU forms of MLX's quantized layers (``nn.QuantizedLinear``, ``nn.QuantizedEmbedding``, affine
mode, the storage the converter writes): they keep the packed storage (memory is the point)
but multiply in floating point, since MLX's CPU ``quantized_matmul`` is a scalar loop on one
thread:

* a handful of rows (token-by-token decoding, up to ``tuning.QUANTIZED_MATMUL_MAX_ROWS``): the
  native GEMV node (all cores, ~20x MLX's loop) where it takes the shape, else
  ``quantized_matmul``, the output columns of a large layer in two halves on the two streams;
* more rows: the weight dequantized on the fly (the native node on every core, else compiled
  element-wise; both bit-identical to ``mx.dequantize``), then an ordinary GEMM; without the
  node, a prefill's large layers dequantize their two halves on the two streams first;
* the DiT's and the VAE's 8-bit layers (never a handful of rows) store their weights K-major
  (:class:`KMajorQuantizedLinear`), which dequantizes faster; with bfloat16 products they take
  the 8-bit GEMM node, which dequantizes each panel of the weight as it packs it;
* 4-bit layers with bfloat16 products (the language model encoding a prompt,
  :class:`EncodingQuantizedLinear`) take the 4-bit GEMM node, which does the same from MLX's layout.
"""

from __future__ import annotations

import functools
import sys

import mlx.core as mx
import mlx.nn as nn

from mobileo_mlx.backends import tuning
from mobileo_mlx.backends.cpu import streams
from mobileo_mlx.backends.cpu.layers import BF16, ENCODING, FP32, Products, use_kernels
from mobileo_mlx.kernels import primitives


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


@functools.lru_cache(maxsize=None)
def _unpacker(bits: int, group_size: int):
    return mx.compile(lambda p, s, b: _unpack_affine(p, s, b, bits, group_size))


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """Affine dequantization: the native node on every core where it takes the weights, else
    the MLX form (compiled once per bits / group size); the same values either way."""
    if use_kernels() and primitives.dequantize_supported(packed, scales, biases, bits, group_size):
        return primitives.dequantize(packed, scales, biases, bits, group_size)
    if 32 % bits:  # 3, 5, 6 bits straddle words: MLX's own kernel
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    return _unpacker(bits, group_size)(packed, scales, biases)


# K-major storage of 8-bit weights. MLX's layout keeps each output row's bytes together,
# [out, K], with one scale per 64 of them: dequantizing broadcasts every scale along the
# innermost axis, which MLX's CPU kernels do slowly. Stored K-major, [K, out] bytes and
# [K / 64, out] scales, the scales broadcast along an outer axis instead: faster, bit-identical,
# and the GEMM x @ W runs as fast (benchmarks/README.md has the numbers). Only for
# layers that never see a handful of rows (quantized_matmul needs MLX's layout).


@functools.lru_cache(maxsize=None)
def _k_major_unpacker(group_size: int):
    def unpack(values: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        groups, outputs = scales.shape
        grouped = values.reshape(groups, group_size, outputs).astype(scales.dtype)
        return (grouped * scales[:, None, :] + biases[:, None, :]).reshape(groups * group_size, outputs)

    return mx.compile(unpack)


def dequantize_k_major(values: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """W.T [K, out] from K-major 8-bit values [K, out] (uint8), scales and biases [K / group_size, out]."""
    return _k_major_unpacker(group_size)(values, scales, biases)


def _quantized_matmul(x, packed, scales, biases, layer) -> mx.array:
    return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=layer.group_size,
                               bits=layer.bits)


def quantized_product(x: mx.array, layer: nn.Module, products: Products = FP32) -> mx.array:
    """``x @ W.T`` for the quantized ``W`` held by ``layer`` (a QuantizedLinear / QuantizedEmbedding)."""
    if getattr(layer, "k_major", False):
        weight = dequantize_k_major(layer["weight"], layer["scales"], layer["biases"], layer.group_size)
        return products.matmul(x, weight.astype(x.dtype))
    packed, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    bits, group_size = layer.bits, layer.group_size
    rows = x.size // max(1, x.shape[-1])
    if (bits == 4 and rows > tuning.QUANTIZED_MATMUL_MAX_ROWS and use_kernels()
            and products.takes_bf16(rows, x.shape[-1], packed.shape[0])
            and primitives.bf16_matmul_q4_supported(x, packed, scales, biases, group_size)):
        # bf16 products of a 4-bit layer (the language model encoding a prompt): its panels packed from the
        # 4-bit words, no float32 weight made (the bits of dequantize + the bf16 GEMM)
        return primitives.bf16_matmul_q4(x, packed, scales, biases, group_size)
    if (rows <= tuning.QUANTIZED_MATMUL_MAX_ROWS and use_kernels()
            and primitives.quantized_gemv_supported(x, packed, scales, biases, bits, group_size)):
        return primitives.quantized_gemv(x, packed, scales, biases, bits, group_size)
    outputs = packed.shape[0]
    split = (outputs * packed.shape[1] * 32 // bits >= tuning.SPLIT_MIN_WEIGHTS and outputs >= 2
             and streams.may_split())
    if rows <= tuning.QUANTIZED_MATMUL_MAX_ROWS:
        if not split:
            return _quantized_matmul(x, packed, scales, biases, layer)
        return streams.split_in_two(
            lambda part: _quantized_matmul(x, packed[part], scales[part], biases[part], layer), outputs, axis=-1)
    native = use_kernels() and primitives.dequantize_supported(packed, scales, biases, bits, group_size)
    if native or not split or rows > tuning.SPLIT_DEQUANTIZE_MAX_ROWS:  # the node uses every core already
        weight = dequantize(packed, scales, biases, bits, group_size)
        return products.matmul(x, weight.astype(x.dtype).T)
    # Not before the input is ready: a helper stream free to run ahead would dequantize
    # every layer of the model at once (all of it in float32 in memory).
    packed, scales, biases = mx.depends([packed, scales, biases], [x])
    half = outputs // 2
    halves = (slice(0, half), slice(half, outputs))
    first, second = streams.cpu_pieces(2, lambda i: dequantize(
        packed[halves[i]], scales[halves[i]], biases[halves[i]], bits, group_size).astype(x.dtype))
    # Both halves before the first GEMM: OpenBLAS splits a GEMM statically between its
    # threads, so a core still busy dequantizing would stall the whole product.
    first = mx.depends(first, second)
    return mx.concatenate([products.matmul(x, first.T), products.matmul(x, second.T)], axis=-1)


def _affine(layer: nn.Module) -> bool:
    return getattr(layer, "mode", "affine") == "affine"


class QuantizedLinear(nn.QuantizedLinear):
    products = FP32

    def __call__(self, x: mx.array) -> mx.array:
        if not _affine(self):
            return super().__call__(x)
        y = quantized_product(x, self, self.products)
        return y + self["bias"] if "bias" in self else y


class KMajorQuantizedLinear(QuantizedLinear):
    """8-bit weights stored K-major (see above), transposed once when swapped in."""

    k_major = False

    def __call__(self, x: mx.array) -> mx.array:
        if self.k_major and self.products.bf16 and use_kernels():
            values, scales, biases = self["weight"], self["scales"], self["biases"]
            bias = self["bias"] if "bias" in self else None
            rows = x.size // max(1, x.shape[-1])
            # the 8-bit GEMM node: no float32 weight made, the bias added as the result is stored
            if (rows * values.size >= tuning.BF16_MIN_PRODUCT
                    and primitives.bf16_matmul_q8_supported(x, values, scales, biases, self.group_size, bias)):
                return primitives.bf16_matmul_q8(x, values, scales, biases, self.group_size, bias)
        return super().__call__(x)

    def prepare(self) -> None:
        if self.bits != 8 or self.k_major or not _affine(self) or sys.byteorder != "little":
            return
        values = mx.contiguous(mx.view(self["weight"], mx.uint8).T)
        scales, biases = mx.contiguous(self["scales"].T), mx.contiguous(self["biases"].T)
        mx.eval(values, scales, biases)  # one layer at a time: the transient copy is one layer
        self.update({"weight": values, "scales": scales, "biases": biases})
        self.k_major = True

    def _extra_repr(self) -> str:
        if not self.k_major:
            return super()._extra_repr()
        in_dims, out_dims = self.weight.shape
        return f"input_dims={in_dims}, output_dims={out_dims}, bits={self.bits}, group_size={self.group_size}, k_major"


class Bf16QuantizedLinear(QuantizedLinear):
    products = BF16


class Bf16KMajorQuantizedLinear(KMajorQuantizedLinear):
    products = BF16


class EncodingQuantizedLinear(QuantizedLinear):
    """The language model's quantized layers with bf16 CPU matmuls (``layers.ENCODING``)."""

    products = ENCODING


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """Looked-up rows dequantized by the compiled unpacker; :meth:`as_linear` (a tied head) as
    :class:`QuantizedLinear` multiplies."""

    def __call__(self, ids: mx.array) -> mx.array:
        if not _affine(self):
            return super().__call__(ids)
        return dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids], self.bits, self.group_size)

    def as_linear(self, x: mx.array) -> mx.array:
        if not _affine(self):
            return super().as_linear(x)
        return quantized_product(x, self)
