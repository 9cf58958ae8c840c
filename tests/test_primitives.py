"""The native CPU kernels as MLX graph nodes (kernels.primitives, native/primitives.cpp): each
against its twin or float64, and what a graph node promises: nothing evaluated while the graph
is built, mx.compile and two CPU streams give the same results, inputs are never written, the
transformations work; what a kernel does not take it says so (``*_supported``), and without the
extension the CPU backend's forms run the twins."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx.backends.cpu import layers
from mobileo_mlx.backends.cpu import quantized as cpu_quantized
from mobileo_mlx.backends.cpu.activations import gelu as gelu_fast
from mobileo_mlx.kernels import depthwise as dw
from mobileo_mlx.kernels import primitives as prim

ROOT = Path(__file__).resolve().parents[1]

# The build is optional only where there is no C++ compiler: with one, a missing extension fails here.
_compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(prim.unavailable_reason() is not None and _compiler is None,
                       reason=f"no C++ compiler: graph nodes {prim.unavailable_reason()}"),
]
needs_bf16 = pytest.mark.skipif(prim.extension() is None or not prim.extension().bf16_supported(),
                                reason="this CPU has no AVX512-BF16")

NODES = ("MobileoGelu", "MobileoDepthwiseConv2d", "MobileoQuantizedGemv", "MobileoDequantize", "MobileoBf16Matmul",
         "MobileoBf16MatmulQ8", "MobileoGatedDepthwise", "MobileoBf16Conv", "MobileoBf16SubpixelConv")


def test_the_extension_is_there():
    assert prim.unavailable_reason() is None
    assert prim.available()


def nodes(*outputs) -> set[str]:
    """The names of our primitives in the graph of ``outputs`` (before evaluation)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return {name for name in NODES if f'"{name}"' in dot.getvalue()}


def same_bits(a, b) -> bool:
    a, b = np.array(a), np.array(b)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def gelu_values(count: int, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(count) * 4).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 13.28125, -13.28125, 13.3, -13.3, -40.0, 40.0,
                        1e-30, -1e-30, 1e-45, -3.0, 3.0], np.float32)
    x[: min(count, special.size)] = special[:count]
    return mx.array(x)


def conv_inputs(shape, k, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    w = mx.array((rng.standard_normal((shape[-1], k, k, 1)) * 0.2).astype(np.float32))
    b = mx.array(rng.standard_normal(shape[-1]).astype(np.float32)) if bias else None
    return x, w, b


def conv_exact(x, w, b, stride, padding) -> np.ndarray:
    """The depthwise conv in float64 (NumPy)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)[..., 0]  # [C, kh, kw]
    (sh, sw), (ph, pw) = stride, padding
    _, height, width, _ = x.shape
    kh, kw = w.shape[1:]
    padded = np.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :] * w[:, i, j]
    return out if b is None else out + np.asarray(b, np.float64)


def quantized(n, k, bits, group_size, seed=0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    return mx.quantize(w, group_size=group_size, bits=bits)


def gemv_exact(x, packed, scales, biases, bits, group_size) -> np.ndarray:
    w = np.asarray(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits), np.float64)
    return np.asarray(x, np.float64) @ w.T


def bf16_rounded(x) -> np.ndarray:
    """float32 rounded to bfloat16 (nearest even), as float64."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


# ------------------------------------------------------------------------------- against twins
@pytest.mark.parametrize("shape", [(7,), (1000, 3), (2, 300, 517)])
def test_gelu_is_bit_identical_to_gelu_fast(shape):
    x = gelu_values(int(np.prod(shape)), seed=len(shape)).reshape(shape)
    y = prim.gelu(x)
    assert nodes(y) == {"MobileoGelu"}
    assert same_bits(y, gelu_fast(x))


def test_gelu_of_strided_views_and_of_a_temporary():
    x = gelu_values(600 * 40, seed=3).reshape(600, 40)
    for view in (x.T, x[::3, 5:]):
        assert same_bits(prim.gelu(view), gelu_fast(view))
    # a temporary no one else holds: its buffer may become the output's (MLX's donation)
    assert same_bits(prim.gelu(x * 1.0), gelu_fast(x))


def test_gelu_takes_over_a_temporary_input_buffer_only():
    x = gelu_values(1 << 20, seed=4)
    x = mx.where(mx.isfinite(x), x, 0.0)
    one = mx.array(1.0)
    mx.eval(x, one)

    def peak_buffers(hold_temporary: bool) -> float:
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        temporary = x * one
        y = prim.gelu(temporary)
        if not hold_temporary:
            del temporary
        mx.eval(y)
        return (mx.get_peak_memory() - before) / x.nbytes

    # held by no one, x * 1 becomes the output (one buffer); held here, it is read, not written (two)
    assert peak_buffers(hold_temporary=False) == 1
    assert peak_buffers(hold_temporary=True) == 2


@pytest.mark.parametrize("shape, k, stride, padding, bias", [
    ((1, 32, 32, 64), 7, (1, 1), (3, 3), True),
    ((2, 17, 23, 16), 3, (1, 1), (1, 1), False),
    ((1, 33, 31, 24), 3, (2, 2), (1, 1), True),
    ((1, 20, 20, 8), 5, (1, 2), (0, 2), True),
])
def test_depthwise_against_float64(shape, k, stride, padding, bias):
    x, w, b = conv_inputs(shape, k, bias)
    y = prim.depthwise_conv2d(x, w, b, stride, padding)
    assert nodes(y) == {"MobileoDepthwiseConv2d"}
    exact = conv_exact(x, w, b, stride, padding)
    assert y.shape == exact.shape
    assert relative_error(y, exact) < 1e-6
    assert relative_error(y, dw.shift_add(x, w, b, stride, padding)) < 2e-6  # its twin


def conv_in_kernel_order(x, w, b, stride, padding) -> np.ndarray:
    """The depthwise conv in float32 (NumPy) in the native kernel's order of operations: the bias
    (or zero), then every tap inside the input, row by row, ``acc + w * x`` rounded twice."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)[..., 0]
    (sh, sw), (ph, pw) = stride, padding
    batch, height, width, channels = x.shape
    kh, kw = w.shape[1:]
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    padded = np.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    inside = np.pad(np.ones((height, width), bool), [(ph, ph), (pw, pw)])
    acc = np.zeros((batch, out_h, out_w, channels), np.float32)
    if b is not None:
        acc += np.asarray(b, np.float32)
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + sh * (out_h - 1) + 1, sh), slice(j, j + sw * (out_w - 1) + 1, sw)
            term = padded[:, rows, cols, :] * w[:, i, j]
            acc = np.where(inside[rows, cols][None, :, :, None], acc + term, acc)
    return acc


@pytest.mark.parametrize("shape, k, stride, padding, bias", [
    ((1, 32, 32, 64), 7, (1, 1), (3, 3), True),
    ((2, 17, 23, 16), 3, (1, 1), (1, 1), False),
    ((1, 33, 31, 24), 3, (2, 2), (1, 1), True),
    ((1, 20, 20, 8), 5, (1, 2), (0, 2), True),
    ((2, 9, 37, 40), 7, (2, 2), (3, 3), True),  # FastViT's downsampler: 7x7, stride 2
    ((1, 5, 6, 8), 7, (1, 1), (3, 3), False),  # narrower than the kernel: every pixel at a border
    ((1, 12, 45, 16), 1, (1, 1), (0, 0), True),
    ((1, 14, 30, 16), 5, (1, 1), (2, 2), True),  # the DC-AE's LiteMLA: 5x5
    ((1, 11, 29, 8), 3, (2, 2), (1, 1), False),  # FastViT's stem: 3x3, stride 2
])
def test_depthwise_sums_in_its_stated_order(shape, k, stride, padding, bias):
    """The node's bits are those of its stated order of operations (what keeps every form that
    uses it reproducible across rewrites of the kernel's loops)."""
    x, w, b = conv_inputs(shape, k, bias, seed=3)
    y = prim.depthwise_conv2d(x, w, b, stride, padding)
    expected = conv_in_kernel_order(x, w, b, stride, padding)
    assert np.array_equal(np.array(y).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("rows, bits, group_size", [(1, 4, 64), (3, 4, 128), (8, 8, 64), (2, 8, 32)])
def test_quantized_gemv_against_float64_and_its_twin(rows, bits, group_size):
    packed, scales, biases = quantized(200, 512, bits, group_size, seed=rows)
    x = mx.random.normal((rows, 512), key=mx.random.key(rows + 10))
    y = prim.quantized_gemv(x, packed, scales, biases, bits, group_size)
    assert nodes(y) == {"MobileoQuantizedGemv"}
    exact = gemv_exact(x, packed, scales, biases, bits, group_size)
    assert relative_error(y, exact) < 1e-5
    twin = mx.quantized_matmul(x, packed, scales, biases, group_size=group_size, bits=bits)
    assert relative_error(y, twin) < 1e-5


def test_quantized_gemv_keeps_leading_axes():
    packed, scales, biases = quantized(96, 256, 4, 64)
    x = mx.random.normal((2, 1, 256))
    y = prim.quantized_gemv(x, packed, scales, biases, 4, 64)
    assert y.shape == (2, 1, 96)
    assert relative_error(y, gemv_exact(x.reshape(2, 256), packed, scales, biases, 4, 64).reshape(2, 1, 96)) < 1e-5


@needs_bf16
@pytest.mark.parametrize("n, k, bits, group_size", [(1, 64, 4, 64), (3, 256, 4, 32), (4864, 896, 4, 64),
                                                    (896, 4864, 8, 64), (5, 128, 8, 128), (2, 1024, 8, 32)])
def test_dequantize_is_bit_identical_to_mx_dequantize(n, k, bits, group_size):
    packed, scales, biases = quantized(n, k, bits, group_size, seed=n)
    got = prim.dequantize(packed, scales, biases, bits, group_size)
    assert nodes(got) == {"MobileoDequantize"} and got.shape == (n, k) and got.dtype == mx.float32
    assert same_bits(got, mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    # views of the weights (a prefill's halves, the rows a layer slices) are read as they are
    assert same_bits(prim.dequantize(packed[1:], scales[1:], biases[1:], bits, group_size), got[1:])


def test_a_prefill_s_quantized_products_dequantize_with_the_node():
    """Many rows: the CPU form dequantizes through the node (every core), with the same
    values as the plain layer's, so the same products."""
    from mlx import nn

    from mobileo_mlx import backends
    from mobileo_mlx.backends import cpu

    plain = nn.QuantizedLinear(512, 1024, bias=True, group_size=64, bits=4)
    plain.update({"bias": mx.random.normal((1024,))})
    fast = backends.swap(nn.QuantizedLinear(512, 1024, bias=True, group_size=64, bits=4), cpu.table("language"))
    fast.update(plain.parameters())
    assert type(fast) is not nn.QuantizedLinear  # the language model's CPU form
    x = mx.random.normal((1, 300, 512))
    y = fast(x)
    assert "MobileoDequantize" in nodes(y)
    weight = mx.dequantize(plain["weight"], plain["scales"], plain["biases"], group_size=64, bits=4)
    assert same_bits(y, x @ weight.T + plain["bias"])


@pytest.mark.parametrize("layout", ["plain", "b transposed", "a transposed", "batched a"])
def test_bf16_matmul_against_float64_of_the_rounded_operands(layout):
    rng = np.random.default_rng(len(layout))
    a = rng.standard_normal((70, 129)).astype(np.float32)
    b = rng.standard_normal((129, 45)).astype(np.float32)
    a_in, b_in = mx.array(a), mx.array(b)
    if layout == "b transposed":  # a Linear layer's W.T: read in place
        b_in = mx.array(np.ascontiguousarray(b.T)).T
    elif layout == "a transposed":
        a_in = mx.array(np.ascontiguousarray(a.T)).T
    elif layout == "batched a":
        a_in = mx.array(a[:70].reshape(2, 35, 129))
    done = prim.extension().bf16_products_done()
    y = prim.bf16_matmul(a_in, b_in)
    assert nodes(y) == {"MobileoBf16Matmul"}
    mx.eval(y)
    assert prim.extension().bf16_products_done() == done + 1  # the C kernel computed it
    exact = bf16_rounded(a) @ bf16_rounded(b)
    assert relative_error(np.asarray(y).reshape(exact.shape), exact) < 1e-6
    # and not the float32 product: the rounding is really there
    assert relative_error(a.astype(np.float64) @ b.astype(np.float64), exact) > 1e-4


@needs_bf16
@pytest.mark.parametrize("addend", ["full", "bias row", "held"])
def test_bf16_matmul_accumulates_into_c(addend):
    """``c + a @ b`` (the window GEMMs of a 3x3 conv, a Linear's bias): c full or broadcast, its
    buffer taken over when no one else holds it, read when someone does."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((50, 64)).astype(np.float32)
    b = rng.standard_normal((64, 40)).astype(np.float32)
    c = rng.standard_normal((50, 40) if addend != "bias row" else (40,)).astype(np.float32)
    c_in = mx.array(c)
    before = np.array(c_in)
    y = prim.bf16_matmul(mx.array(a), mx.array(b), c_in * 1.0 if addend == "full" else c_in)
    exact = c.astype(np.float64) + bf16_rounded(a) @ bf16_rounded(b)
    assert relative_error(y, exact) < 1e-6
    assert same_bits(c_in, before)  # a held addend is never written
    assert relative_error(prim.bf16_matmul_reference(mx.array(a), mx.array(b), c_in), exact) < 1e-6


@needs_bf16
@pytest.mark.parametrize("row_shape", ["[N]", "[1, N]"])
def test_bf16_matmul_adds_a_bias_row_as_it_stores_the_product(row_shape):
    """A bias row (a Linear layer's) is added after the sums as the kernel stores the result: the
    bits of the product followed by ``+ bias``, and no [M, N] copy of the row is made."""
    rng = np.random.default_rng(12)
    a = mx.array(rng.standard_normal((300, 192)).astype(np.float32))
    b = mx.array(rng.standard_normal((192, 70)).astype(np.float32))
    bias = mx.array(rng.standard_normal((70,) if row_shape == "[N]" else (1, 70)).astype(np.float32))
    mx.eval(a, b, bias)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    y = prim.bf16_matmul(a, b, bias)
    mx.eval(y)
    assert mx.get_peak_memory() - before == y.nbytes  # only the output
    assert same_bits(y, prim.bf16_matmul(a, b) + bias)
    exact = bf16_rounded(a) @ bf16_rounded(b) + np.asarray(bias, np.float64)
    assert relative_error(y, exact) < 1e-6


def _strided_operands(layout: str):
    """(a as passed, b as passed, a's values, b's values) for a layout of the operands."""
    rng = np.random.default_rng(11)
    big = rng.standard_normal((300, 130)).astype(np.float32)
    a, b = big[37:107, :64], big[150:214, 7:52]  # [70, 64] @ [64, 45]
    a_in, b_in = mx.array(a), mx.array(b)
    source = mx.array(big)
    if layout == "a a window of a larger array":  # the DC-AE's window GEMMs: rows[:, offset : offset + span]
        a_in = source[None, :, :64][:, 37:107]
    elif layout == "a every other row":
        a = big[0:140:2, :64]
        a_in = source[0:140:2, :64]
    elif layout == "a rows reversed":
        a = big[106:36:-1, :64]
        a_in = source[106:36:-1, :64]
    elif layout == "a one row broadcast":
        a = np.broadcast_to(big[5, :64], (70, 64))
        a_in = mx.broadcast_to(source[5, :64], (70, 64))
    elif layout == "a every other column":
        a = big[37:107, 0:128:2]
        a_in = source[37:107, 0:128:2]
    elif layout == "a transposed batch":  # [2, 35, 64] from a [64, 2, 35] array
        a_in = mx.array(np.ascontiguousarray(a.reshape(2, 35, 64).transpose(2, 0, 1))).transpose(1, 2, 0)
    elif layout == "b a window of a larger array":
        b_in = source[150:214, 7:52]
    elif layout == "b a transposed window":  # W.T of rows 10..55 of a larger W
        b = big[10:55, 20:84].T
        b_in = source[10:55, 20:84].T
    return a_in, b_in, a, b


@needs_bf16
@pytest.mark.parametrize("layout", ["a a window of a larger array", "a every other row", "a rows reversed",
                                    "a one row broadcast", "a every other column", "a transposed batch",
                                    "b a window of a larger array", "b a transposed window"])
def test_bf16_matmul_reads_strided_operands(layout):
    """Operands whose rows (or columns) are evenly spaced are read in place through their strides;
    any other layout is gathered first: the same product either way."""
    a_in, b_in, a, b = _strided_operands(layout)
    y = prim.bf16_matmul(a_in, b_in)
    exact = bf16_rounded(a) @ bf16_rounded(b)
    assert relative_error(np.asarray(y).reshape(exact.shape), exact) < 1e-6


@needs_bf16
def test_bf16_matmul_reads_a_window_without_copying_it():
    rows = mx.random.normal((1, 5000, 256))
    weight = mx.random.normal((16, 256))
    mx.eval(rows, weight)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    y = prim.bf16_matmul(rows[:, 1000:4000], weight.T)
    mx.eval(y)
    assert mx.get_peak_memory() - before == y.nbytes  # only the output: the window was not copied


# ------------------------------------------------------------- bfloat16 GEMM, 8-bit weights
def q8_operands(m: int, k: int, n: int, bias: bool, seed: int = 0, group_size: int = 64):
    """NumPy operands of an 8-bit K-major layer: x [m, k], values [k, n] uint8, scales and biases
    [k / group_size, n] (as a converted layer holds them), the bias row or None."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    values = rng.integers(0, 256, (k, n), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (k // group_size, n)).astype(np.float32)
    biases = (-128 * scales * rng.uniform(0.8, 1.2, scales.shape)).astype(np.float32)
    row = rng.standard_normal(n).astype(np.float32) if bias else None
    return x, values, scales, biases, row


def q8_weight(values, scales, biases, group_size: int = 64) -> np.ndarray:
    """W [K, N] = values * scales + biases in float32 (NumPy: each operation rounded once)."""
    groups = np.arange(values.shape[0]) // group_size
    product = values.astype(np.float32) * scales[groups]
    return product + biases[groups]


def q8_exact(x, values, scales, biases, row, group_size: int = 64) -> np.ndarray:
    """float64 product of the bf16-rounded x and float32 W, plus the bias."""
    product = bf16_rounded(x) @ bf16_rounded(q8_weight(values, scales, biases, group_size))
    return product if row is None else product + row.astype(np.float64)


def q8_twin(x, values, scales, biases, row, group_size: int = 64) -> mx.array:
    """The form the node replaces: the weight dequantized whole, the float bf16 node, then the bias."""
    y = prim.bf16_matmul(x, cpu_quantized.dequantize_k_major(values, scales, biases, group_size))
    return y if row is None else y + row


Q8_SHAPES = [(1, 64, 1), (1, 1152, 1152), (5, 128, 33), (33, 192, 45), (70, 1152, 100), (300, 64, 97),
             (2048, 128, 64), (2048, 1152, 36)]


@needs_bf16
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("shape", Q8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_matmul_q8_equals_its_twin_and_float64(shape, bias):
    """The node gives the bits of the float node on the dequantized weight followed by ``+ bias``
    (the same kernel, the same order of sums), for M and N tails, and equals the float64 product of
    the rounded operands to float32 summation error."""
    x, values, scales, biases, row = q8_operands(*shape, bias, seed=sum(shape))
    args = [mx.array(v) for v in (x, values, scales, biases)] + [None if row is None else mx.array(row)]
    done = prim.extension().bf16_products_done()
    y = prim.bf16_matmul_q8(*args[:4], 64, args[4])
    assert nodes(y) == {"MobileoBf16MatmulQ8"}
    mx.eval(y)
    assert prim.extension().bf16_products_done() == done + 1  # the C kernel computed it
    assert y.shape == (shape[0], shape[2])
    assert same_bits(y, q8_twin(*args))
    exact = q8_exact(x, values, scales, biases, row)
    assert relative_error(y, exact) < 1e-6
    assert relative_error(prim.bf16_matmul_q8_reference(*args[:4], 64, args[4]), exact) < 1e-6
    if shape[1] * shape[2] >= 100:  # the dequantized weight is really rounded to bfloat16
        float32_product = x.astype(np.float64) @ q8_weight(values, scales, biases).astype(np.float64)
        assert relative_error(float32_product, exact) > 1e-4


@needs_bf16
@pytest.mark.parametrize("group_size", [3, 32, 128])
def test_bf16_matmul_q8_other_group_sizes(group_size):
    """Any group size dividing K, an odd one too (a k pair then straddles two groups)."""
    k = 4 * group_size if group_size > 3 else 21
    x, values, scales, biases, row = q8_operands(9, k, 37, True, seed=group_size, group_size=group_size)
    args = [mx.array(v) for v in (x, values, scales, biases)]
    y = prim.bf16_matmul_q8(*args, group_size, mx.array(row))
    assert same_bits(y, q8_twin(*args, mx.array(row), group_size))
    assert relative_error(y, q8_exact(x, values, scales, biases, row, group_size)) < 1e-6


@needs_bf16
@pytest.mark.parametrize("layout", ["batched", "transposed", "window"])
def test_bf16_matmul_q8_reads_x_in_any_layout(layout):
    x, values, scales, biases, row = q8_operands(70, 128, 45, True, seed=3)
    weights = [mx.array(v) for v in (values, scales, biases)]
    if layout == "batched":
        x_in = mx.array(x).reshape(2, 35, 128)
    elif layout == "transposed":
        x_in = mx.array(np.ascontiguousarray(x.T)).T
    else:
        x_in = mx.array(np.concatenate([x, x], axis=1))[:, 64:192]
        x = np.concatenate([x, x], axis=1)[:, 64:192]
    y = prim.bf16_matmul_q8(x_in, *weights, 64, mx.array(row))
    assert y.shape == (*x_in.shape[:-1], 45)
    assert relative_error(np.asarray(y).reshape(70, 45), q8_exact(x, values, scales, biases, row)) < 1e-6


@needs_bf16
def test_bf16_matmul_q8_builds_lazily_and_never_writes_its_inputs():
    operands = [mx.array(v) for v in q8_operands(64, 256, 384, True, seed=4)]
    built_lazily(lambda: operands, lambda x, v, s, b, row: prim.bf16_matmul_q8(x, v, s, b, 64, row))
    copies = [np.array(v) for v in operands]
    first = prim.bf16_matmul_q8(*operands[:4], 64, operands[4])
    mx.eval(first)
    assert all(same_bits(v, c) if v.dtype != mx.uint8 else np.array_equal(np.array(v), c)
               for v, c in zip(operands, copies))
    assert same_bits(prim.bf16_matmul_q8(*operands[:4], 64, operands[4]), first)
    compiled = mx.compile(lambda *v: prim.bf16_matmul_q8(*v[:4], 64, v[4]) * 2.0)
    assert same_bits(compiled(*operands), first * 2.0)


@needs_bf16
def test_what_the_q8_node_does_not_take_it_says():
    x, values, scales, biases, row = (mx.array(v) for v in q8_operands(8, 128, 40, True))
    assert prim.bf16_matmul_q8_supported(x, values, scales, biases, 64, row)
    assert not prim.bf16_matmul_q8_supported(x, values, scales, biases, 48, row)  # 48 does not divide K
    assert not prim.bf16_matmul_q8_supported(x[:, :100], values[:100], scales, biases, 64, row)  # K % 64
    assert not prim.bf16_matmul_q8_supported(x, values.astype(mx.uint32), scales, biases, 64, row)
    assert not prim.bf16_matmul_q8_supported(x.astype(mx.float16), values, scales, biases, 64, row)
    assert not prim.bf16_matmul_q8_supported(x, values, scales, biases, 64, row[:39])
    with pytest.raises(ValueError):
        prim.bf16_matmul_q8(x, values, scales, biases, 48)


# ---------------------------------------------------------------------------- graph behaviour
def built_lazily(make_inputs, op) -> None:
    """Building ``op`` on lazy inputs allocates nothing (no evaluation); evaluating it does."""
    inputs = make_inputs()
    mx.eval(inputs)
    one = mx.array(1.0)
    mx.eval(one)
    before = mx.get_active_memory()
    lazy = [v * one if v.dtype == mx.float32 else v for v in inputs]  # not evaluated: no buffers yet
    out = op(*lazy)
    assert mx.get_active_memory() == before, "building the graph evaluated something"
    mx.eval(out)
    assert mx.get_active_memory() > before + out.nbytes // 2


def test_building_a_node_evaluates_nothing():
    built_lazily(lambda: [gelu_values(1 << 16)], lambda x: prim.gelu(x))
    built_lazily(lambda: list(conv_inputs((1, 32, 32, 64), 7)), lambda x, w, b: prim.depthwise_conv2d(x, w, b, 1, 3))
    built_lazily(lambda: [mx.random.normal((1, 512)), *quantized(4096, 512, 4, 64)],
                 lambda x, p, s, b: prim.quantized_gemv(x, p, s, b, 4, 64))
    built_lazily(lambda: list(quantized(4096, 512, 8, 64)), lambda p, s, b: prim.dequantize(p, s, b, 8, 64))
    if prim.extension().bf16_supported():
        built_lazily(lambda: [mx.random.normal((64, 256)), mx.random.normal((256, 512))], prim.bf16_matmul)


def test_the_laziness_check_sees_an_evaluation():
    # what a kernel called outside the graph would do (evaluate its inputs) the check above catches
    x = gelu_values(1 << 16)
    one = mx.array(1.0)
    mx.eval(x, one)
    before = mx.get_active_memory()
    lazy = x * one
    mx.eval(lazy)
    assert mx.get_active_memory() > before


def four_ops():
    x = gelu_values(1 << 15, seed=5).reshape(64, 512)
    x = mx.where(mx.isfinite(x), x, 1.0)
    cx, cw, cb = conv_inputs((1, 24, 24, 32), 3, seed=6)
    packed, scales, biases = quantized(300, 512, 4, 64, seed=7)
    ops = [
        (prim.gelu, [x]),
        (lambda v, w, b: prim.depthwise_conv2d(v, w, b, 1, 1), [cx, cw, cb]),
        (lambda v, p, s, b: prim.quantized_gemv(v, p, s, b, 4, 64), [x[:2], packed, scales, biases]),
    ]
    if prim.extension().bf16_supported():
        ops.append((prim.bf16_matmul, [x, mx.random.normal((512, 96), key=mx.random.key(8))]))
    return ops


def test_mx_compile_gives_the_same_results():
    for op, inputs in four_ops():
        eager = op(*inputs) * 2.0 + 1.0
        compiled = mx.compile(lambda *v, op=op: op(*v) * 2.0 + 1.0)
        assert same_bits(compiled(*inputs), eager)
        assert same_bits(compiled(*inputs), eager)  # the cached trace too


def test_two_cpu_streams_give_the_same_results():
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    for op, inputs in four_ops():
        expected = op(*inputs)
        mx.eval(expected)
        with mx.stream(first):
            a = op(*inputs)
        with mx.stream(second):
            b = op(*inputs)
        mx.eval(a, b)  # both streams evaluate at once, the kernels' pool takes turns
        assert same_bits(a, expected) and same_bits(b, expected)
    # on a GPU stream the node is refused (a CPU kernel)
    with pytest.raises(ValueError):
        prim.extension().gelu(inputs[0], stream=mx.Device(mx.gpu))


def test_inputs_are_never_written():
    for op, inputs in four_ops():
        mx.eval(inputs)
        copies = [np.array(v) for v in inputs]
        out = op(*inputs)
        mx.eval(out)
        assert all(same_bits(v, c) for v, c in zip(inputs, copies))
        assert same_bits(op(*inputs), out)  # used again: the same result


def test_gradients_and_vmap_go_through_the_plain_formula():
    x = gelu_values(4096, seed=8).reshape(64, 64)
    x = mx.where(mx.isfinite(x), x, 0.0)
    grad = mx.grad(lambda v: prim.gelu(v).sum())(x)
    assert relative_error(grad, mx.grad(lambda v: prim.gelu_reference(v).sum())(x)) < 1e-6
    tangent = mx.jvp(lambda v: prim.gelu(v), [x], [mx.ones_like(x)])[1][0]
    assert relative_error(tangent, grad) < 1e-6
    assert same_bits(mx.vmap(lambda v: prim.gelu(v), in_axes=1)(x), gelu_fast(x).T)

    cx, cw, cb = conv_inputs((2, 12, 12, 16), 3, seed=9)
    conv = lambda v, w: prim.depthwise_conv2d(v, w, cb, 1, 1)  # noqa: E731
    plain = lambda v, w: dw.reference(v, w, cb, 1, 1)  # noqa: E731
    for got, want in zip(mx.grad(lambda v, w: conv(v, w).sum(), argnums=(0, 1))(cx, cw),
                         mx.grad(lambda v, w: plain(v, w).sum(), argnums=(0, 1))(cx, cw)):
        assert relative_error(got, want) < 1e-5
    batched = mx.vmap(lambda v: conv(v[None], cw)[0])(cx)
    assert relative_error(batched, conv_exact(cx, cw, cb, (1, 1), (1, 1))) < 1e-6

    packed, scales, biases = quantized(64, 256, 8, 64)
    v = mx.random.normal((1, 256))
    got = mx.grad(lambda u: prim.quantized_gemv(u, packed, scales, biases, 8, 64).sum())(v)
    want = mx.grad(lambda u: mx.quantized_matmul(u, packed, scales, biases, group_size=64, bits=8).sum())(v)
    assert relative_error(got, want) < 1e-5

    if prim.extension().bf16_supported():
        a, b = mx.random.normal((8, 32)), mx.random.normal((32, 16))
        for got, want in zip(mx.grad(lambda p, q: prim.bf16_matmul(p, q).sum(), argnums=(0, 1))(a, b),
                             mx.grad(lambda p, q: prim.bf16_matmul_reference(p, q).sum(), argnums=(0, 1))(a, b)):
            assert relative_error(got, want) < 1e-6
        u, values, scales, biases, row = (mx.array(v) for v in q8_operands(8, 128, 40, True, seed=13))
        got = mx.grad(lambda p: prim.bf16_matmul_q8(p, values, scales, biases, 64, row).sum())(u)
        want = mx.grad(lambda p: prim.bf16_matmul_q8_reference(p, values, scales, biases, 64, row).sum())(u)
        assert relative_error(got, want) < 1e-6
        batched = mx.vmap(lambda p: prim.bf16_matmul_q8(p, values, scales, biases, 64, row))(u.reshape(2, 4, 128))
        assert relative_error(batched.reshape(8, 40), prim.bf16_matmul_q8(u, values, scales, biases, 64, row)) < 1e-6


# ---------------------------------------------------------------------------------- fallbacks
def test_what_a_kernel_does_not_take_it_says():
    assert not prim.gelu_supported(gelu_values(1000).astype(mx.float16))
    x, w, b = conv_inputs((1, 10, 10, 12), 3)  # channels not a multiple of 8
    assert not prim.depthwise_supported(x, w, b, 1, 1)
    x8, w8, b8 = conv_inputs((1, 10, 10, 8), 3)
    assert prim.depthwise_supported(x8, w8, b8, 1, 1)
    assert not prim.depthwise_supported(x8, mx.concatenate([w8, w8]), None, 1, 1)  # a channel multiplier
    packed, scales, biases = quantized(64, 256, 4, 64)
    nine = mx.random.normal((9, 256))  # more rows than the kernel keeps in registers
    assert not prim.quantized_gemv_supported(nine, packed, scales, biases, 4, 64)
    assert prim.quantized_gemv_supported(nine[:8], packed, scales, biases, 4, 64)
    assert not prim.quantized_gemv_supported(nine[:1], *quantized(64, 256, 6, 64), 6, 64)
    assert prim.dequantize_supported(packed, scales, biases, 4, 64)
    assert not prim.dequantize_supported(*quantized(64, 256, 6, 64), 6, 64)  # values straddle words
    assert not prim.dequantize_supported(packed, scales.astype(mx.float16), biases, 4, 64)
    a, batched_b = mx.random.normal((2, 8, 16)), mx.random.normal((2, 16, 4))
    assert not prim.bf16_matmul_supported(a, batched_b)


def test_without_the_extension_the_cpu_forms_run_the_twins(monkeypatch):
    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", "not built (simulated)")
    assert not prim.available() and prim.status() == "unavailable: not built (simulated)"
    x = gelu_values(5000)
    y = layers.GELU()(x)
    assert same_bits(y, gelu_fast(x)) and not nodes(y)
    cx, cw, cb = conv_inputs((1, 16, 16, 32), 5)
    y = layers.depthwise_conv2d(cx, cw, cb, (1, 1), (2, 2))
    assert same_bits(y, dw.shift_add(cx, cw, cb, 1, 2)) and not nodes(y)
    from mobileo_mlx.backends.cpu import quantized as cpu_quantized

    packed, scales, biases = quantized(64, 256, 4, 64)
    y = cpu_quantized.dequantize(packed, scales, biases, 4, 64)
    assert same_bits(y, mx.dequantize(packed, scales, biases, group_size=64, bits=4)) and not nodes(y)
    a, b = mx.random.normal((300, 256)), mx.random.normal((256, 64))
    monkeypatch.setattr(layers.tuning, "BF16_MIN_PRODUCT", 0)
    assert same_bits(layers.BF16.matmul(a, b), prim.bf16_matmul_reference(a, b))


def test_an_extension_built_for_another_mlx_is_not_used(monkeypatch):
    class Stale:
        BUILT_FOR_MLX = "0.1.0"

    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", None)
    monkeypatch.setattr(prim.importlib, "import_module", lambda name: Stale)
    assert prim.extension() is None
    assert prim.unavailable_reason() == f"built for mlx 0.1.0, this is mlx {mx.__version__}: reinstall mobileo-mlx"


def test_an_extension_that_does_not_share_mlx_types_is_not_used(monkeypatch):
    class Foreign:  # as a module built with another nanobind ABI: mx.array is a stranger to it
        BUILT_FOR_MLX = mx.__version__

        @staticmethod
        def ndim(array):
            raise TypeError("ndim(): incompatible function arguments")

    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", None)
    monkeypatch.setattr(prim.importlib, "import_module", lambda name: Foreign)
    assert prim.extension() is None
    assert "nanobind" in prim.unavailable_reason()


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The package's sources without any built library."""
    source = tmp_path_factory.mktemp("sources") / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("mobileo_mlx", "convert", "kernels"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return source


@pytest.mark.slow
@pytest.mark.parametrize("compilers, built", [
    ({"CC": "false", "CXX": "false"}, set()),                        # no compiler at all
    ({"CXX": "/nonexistent/c++"}, {"blas_shim", "cpu_kernels"}),     # C but no C++: no graph nodes
])
def test_without_a_compiler_the_package_installs_and_the_twins_run(source_copy, tmp_path, compilers, built):
    # what `pip install` (make demo / make test) does, with a compiler that fails
    site = tmp_path / "site"
    env = {**os.environ, **compilers, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                            "--build-constraint", str(ROOT / "constraints.txt"), str(source_copy)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert {path.name.split(".")[0] for path in site.rglob("*.so")} == built
    script = """
import mobileo_mlx, mlx.core as mx
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.backends.cpu import activations, layers
assert mobileo_mlx.__file__.startswith(%r), mobileo_mlx.__file__
assert prim.unavailable_reason().startswith("not built"), prim.unavailable_reason()
x = mx.random.normal((4096,))
assert mx.array_equal(layers.GELU()(x), activations.gelu(x)).item()
w = mx.random.normal((16, 3, 3, 1))
assert layers.depthwise_conv2d(mx.random.normal((1, 8, 8, 16)), w, None, (1, 1), (1, 1)).shape == (1, 8, 8, 16)
print("twins ok")
""" % str(site)
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "twins ok" in run.stdout, run.stderr[-3000:]


# ---------------------------------------------------------------- GLUMBConv's gated depthwise
GATED = "MobileoGatedDepthwise"


def has_gated_node(*outputs) -> bool:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return f'"{GATED}"' in dot.getvalue()


def gated_inputs(shape, k=3, bias_scale=1.0, seed=0):
    """h [B, H, W, 2C] as a conv_inverted output, taps [2C, k, k, 1], bias [2C] (or None: scale 0)."""
    rng = np.random.default_rng(seed)
    h = mx.array((rng.standard_normal(shape) * 3).astype(np.float32))
    w = mx.array((rng.standard_normal((shape[-1], k, k, 1)) * 0.3).astype(np.float32))
    b = mx.array((rng.standard_normal(shape[-1]) * bias_scale).astype(np.float32)) if bias_scale else None
    return h, w, b


def gated_exact(h, w, b) -> np.ndarray:
    """GLUMBConv's middle in float64 (NumPy)."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    k = w.shape[1]
    d = conv_exact(silu(np.asarray(h, np.float64)), w, b, (1, 1), (k // 2, k // 2))
    values, gates = np.split(d, 2, axis=-1)
    return values * silu(gates)


@pytest.mark.parametrize("shape, k, bias_scale", [
    ((1, 5, 7, 16), 3, 1.0),  # C = 8, one vector
    ((2, 6, 5, 48), 3, 1.0),
    ((1, 1, 1, 32), 3, 1.0),  # every tap but the centre in the padding
    ((2, 3, 9, 5760), 3, 1.0),  # the DiT's C = 2880 (the last block of 64 channels a partial one)
    ((1, 17, 13, 144), 3, 8.0),  # odd sizes; biases that saturate the gate's SiLU
    ((2, 11, 6, 272), 3, 0.0),  # no bias
    ((1, 9, 10, 64), 5, 1.0),
    ((2, 4, 7, 32), 1, 1.0),
])
def test_gated_depthwise_against_float64_and_its_twin(shape, k, bias_scale):
    h, w, b = gated_inputs(shape, k, bias_scale, seed=shape[-1] + k)
    y = prim.gated_depthwise(h, w, b)
    assert has_gated_node(y)
    exact = gated_exact(h, w, b)
    assert y.shape == exact.shape == (*shape[:-1], shape[-1] // 2)
    assert relative_error(y, exact) < 1e-6
    assert relative_error(y, prim.gated_depthwise_reference(h, w, b)) < 1e-6  # the plain-MLX twin


@pytest.mark.parametrize("shape", [(1, 5, 7, 16), (2, 6, 5, 48), (1, 9, 4, 400), (2, 8, 8, 1152)])
def test_gated_depthwise_is_bit_identical_to_the_cpu_forms_mlx_path(shape, monkeypatch):
    """The node sums what the CPU form's MLX kernels sum, in their order (fast SiLU, the
    shift-and-add taps, bias last, glu_silu): batch halves (even batch) or channel halves."""
    h, w, b = gated_inputs(shape, seed=len(shape) + shape[-1])
    node = prim.gated_depthwise(h, w, b)
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    mlx_form = layers.gated_depthwise(h, w, b)
    assert not has_gated_node(mlx_form)
    assert same_bits(node, mlx_form)


@pytest.mark.parametrize("shape, k, bias_scale", [
    ((1, 1, 1, 16), 3, 1.0),  # one pixel, one half vector
    ((2, 2, 3, 528), 3, 1.0),  # C = 264: a block of 256 channels, then a half vector alone
    ((1, 3, 2, 5776), 3, 1.0),  # C = 2888: eleven blocks of 256, the last 72 (four vectors and a half)
    ((2, 3, 1, 48), 3, 1.0),  # one column
    ((1, 2, 9, 1040), 5, 1.0),  # C = 520: two whole blocks and a half vector; a row of 4 + 4 + 1 pixels
    ((2, 5, 6, 64), 1, 1.0),
])
def test_gated_depthwise_tails_are_bit_identical_to_the_cpu_forms_mlx_path(shape, k, bias_scale, monkeypatch):
    """The node's 16-lane blocks, their half-vector tails and the last pixels of a row against the
    CPU form's MLX path, bit for bit."""
    h, w, b = gated_inputs(shape, k, bias_scale, seed=shape[-1] + 7 * k)
    node = prim.gated_depthwise(h, w, b)
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    mlx_form = layers.gated_depthwise(h, w, b)
    assert not has_gated_node(mlx_form)
    assert same_bits(node, mlx_form)


def test_gated_depthwise_of_special_values(monkeypatch):
    h, w, b = gated_inputs((1, 6, 7, 32), seed=3)
    special = np.array(h)
    special[0, 0, 0, :8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.0, -88.5, -1e-30]  # value channels
    special[0, 4, 5, 16:24] = [200.0, -200.0, 1e30, -1e30, 87.9, -87.9, 1e-40, -1e-40]  # gate channels
    y = np.array(prim.gated_depthwise(mx.array(special), w, b))
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    mlx_form = np.array(layers.gated_depthwise(mx.array(special), w, b))
    nan = np.isnan(y)
    assert np.array_equal(nan, np.isnan(mlx_form)) and same_bits(y[~nan], mlx_form[~nan])  # NaN signs may differ
    assert nan[0, :2, :2].any()  # the NaN and infinities reach the outputs that read them
    special[0, 0, 0] = 0.0  # which rows 2 and below do not read
    with np.errstate(over="ignore"):
        exact = gated_exact(special, w, b)
    assert np.isfinite(y[:, 2:]).all()
    assert relative_error(y[:, 2:], exact[:, 2:]) < 1e-6


def test_gated_depthwise_as_a_graph_node():
    built_lazily(lambda: list(gated_inputs((2, 16, 16, 256))), lambda h, w, b: prim.gated_depthwise(h, w, b))
    h, w, b = gated_inputs((2, 12, 10, 160), seed=4)
    mx.eval(h, w, b)
    copies = [np.array(v) for v in (h, w, b)]
    expected = prim.gated_depthwise(h, w, b)
    mx.eval(expected)
    assert all(same_bits(v, c) for v, c in zip((h, w, b), copies))  # inputs never written
    compiled = mx.compile(lambda *v: prim.gated_depthwise(*v) * 2.0)
    assert same_bits(compiled(h, w, b), expected * 2.0)
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    with mx.stream(first):
        a = prim.gated_depthwise(h, w, b)
    with mx.stream(second):
        c = prim.gated_depthwise(h[:1], w, b)
    mx.eval(a, c)
    assert same_bits(a, expected) and same_bits(c, expected[:1])
    # transformations through the plain formula
    grads = mx.grad(lambda *v: prim.gated_depthwise(*v).sum(), argnums=(0, 1, 2))(h, w, b)
    plain = mx.grad(lambda *v: prim.gated_depthwise_reference(*v).sum(), argnums=(0, 1, 2))(h, w, b)
    assert all(relative_error(g, p) < 1e-5 for g, p in zip(grads, plain))
    batched = mx.vmap(lambda v: prim.gated_depthwise(v[None], w, b)[0])(h)
    assert relative_error(batched, gated_exact(h, w, b)) < 1e-6


def test_what_the_gated_depthwise_does_not_take_it_says():
    h, w, b = gated_inputs((1, 6, 6, 32))
    assert prim.gated_depthwise_supported(h, w, b) and prim.gated_depthwise_supported(h, w, None)
    assert not prim.gated_depthwise_supported(h.astype(mx.float16), w, b)
    assert not prim.gated_depthwise_supported(h, w, b.astype(mx.bfloat16))
    h24, w24, b24 = gated_inputs((1, 6, 6, 24))  # C = 12, not a multiple of 8
    assert not prim.gated_depthwise_supported(h24, w24, b24)
    assert not prim.gated_depthwise_supported(h, mx.zeros((32, 4, 4, 1)), b)  # an even kernel
    assert not prim.gated_depthwise_supported(h, mx.zeros((32, 3, 5, 1)), b)  # not square
    assert not prim.gated_depthwise_supported(h, w, b[:16])
    with pytest.raises(ValueError, match="multiple of 8"):
        prim.gated_depthwise(h24, w24, b24)


def test_without_the_extension_the_glumbconv_middle_runs_in_mlx(monkeypatch):
    h, w, b = gated_inputs((2, 6, 5, 48), seed=5)
    node = prim.gated_depthwise(h, w, b)
    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", "not built (simulated)")
    y = layers.gated_depthwise(h, w, b)
    assert not has_gated_node(y) and same_bits(y, node)


# ---------------------------------------------------------------- bfloat16 conv (implicit GEMM)
# (B, H, W, C, O, k, padding, bias, init): batch 1 and 2, maps of one pixel, narrower than a
# tile, H / W not multiples of 16, C and O not multiples of 16 / 32 (K odd), the 2x2 parity
# convs of the upsampler (each padding), many rows with a B larger than a panel block (the
# parts split the rows, in groups of A tiles), few rows with a large B (A packed whole).
CONV_CASES = [
    (1, 1, 1, 1, 1, 3, (1, 1), True, False),
    (1, 1, 1, 24, 8, 3, (1, 1), False, False),    # every tap but the centre in the padding
    (2, 5, 7, 3, 5, 3, (1, 1), True, False),
    (1, 9, 9, 17, 33, 3, (1, 1), False, False),
    (2, 3, 20, 48, 40, 3, (1, 1), True, True),
    (1, 2, 9, 64, 64, 3, (1, 1), True, False),
    (2, 16, 16, 32, 16, 3, (1, 1), True, False),
    (1, 8, 40, 128, 128, 3, (1, 1), True, False),
    (2, 7, 5, 33, 20, 2, (0, 1), True, True),
    (1, 6, 9, 16, 16, 2, (1, 0), False, True),
    (2, 4, 3, 40, 24, 2, (1, 1), True, True),
    (1, 5, 6, 8, 72, 2, (0, 0), False, False),
    (1, 40, 37, 130, 70, 3, (1, 1), True, False),
    (1, 47, 47, 256, 520, 3, (1, 1), True, False),   # AMX: B over 2 MB a part, A tiles in groups, an odd last tile
    (1, 4, 4, 512, 300, 3, (1, 1), True, True),
    (1, 121, 128, 128, 40, 3, (1, 1), True, True),   # the register tile: two chunks of rows (bf16_gemm.c)
]


def conv_case_id(case) -> str:
    b, h, w, c, o, k, padding, bias, init = case
    return f"{b}x{h}x{w}x{c}-{o}-k{k}-p{padding[0]}{padding[1]}" + ("-bias" if bias else "") + ("-init" if init else "")


def bf16_conv_operands(case, seed: int = 0):
    """NumPy float32 x, weight, bias or None, init or None of a CONV_CASES case."""
    b, h, w, c, o, k, _, bias, init = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    weight = (rng.standard_normal((o, k, k, c)) * 0.2).astype(np.float32)
    row = rng.standard_normal(o).astype(np.float32) if bias else None
    addend = rng.standard_normal((b, h, w, o)).astype(np.float32) if init else None
    return x, weight, row, addend


def bf16_conv_exact(x, weight, bias, padding, init) -> np.ndarray:
    """float64 [init +] conv of the bf16-rounded x and weight (output the input's size) [+ bias]."""
    x, weight = bf16_rounded(x), bf16_rounded(weight)
    b, h, w, _ = x.shape
    kh, kw = weight.shape[1:3]
    padded = np.pad(x, [(0, 0), (padding[0], kh - 1 - padding[0]), (padding[1], kw - 1 - padding[1]), (0, 0)])
    out = np.zeros((b, h, w, weight.shape[0])) if init is None else init.astype(np.float64)
    for i in range(kh):
        for j in range(kw):
            out = out + padded[:, i : i + h, j : j + w] @ weight[:, i, j].T
    return out if bias is None else out + bias.astype(np.float64)


def bf16_conv_tolerance(case) -> float:
    """float32 sums over K = k k C (the AVX512-BF16 register tile's running sum grows with K)."""
    return 1e-6 if case[5] * case[5] * case[3] <= 1152 else 3e-6


@needs_bf16
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_bf16_conv_against_float64_of_the_rounded_operands_and_its_twin(case):
    x, weight, bias, init = bf16_conv_operands(case, seed=sum(case[:5]))
    padding = case[6]
    args = [mx.array(x), mx.array(weight), None if bias is None else mx.array(bias), padding,
            None if init is None else mx.array(init)]
    done = prim.extension().bf16_products_done()
    y = prim.bf16_conv(*args)
    assert nodes(y) == {"MobileoBf16Conv"}
    mx.eval(y)
    assert prim.extension().bf16_products_done() == done + 1  # one product, K = k k C, by the C kernel
    exact = bf16_conv_exact(x, weight, bias, padding, init)
    assert y.shape == exact.shape
    assert relative_error(y, exact) < bf16_conv_tolerance(case)
    assert relative_error(prim.bf16_conv_reference(*args), exact) < bf16_conv_tolerance(case)
    if x.size * case[4] >= 1000:  # and the operands really are rounded to bfloat16
        float32 = prim.bf16_conv_reference(*args)  # (the twin's sums) against the conv of float32 operands
        plain = mx.conv_general(args[0], args[1], padding=([padding[0], padding[1]],
                                                           [case[5] - 1 - padding[0], case[5] - 1 - padding[1]]))
        assert relative_error(plain, float32) > 1e-4


@needs_bf16
def test_bf16_conv3x3_is_the_padding_1_conv():
    x, weight, bias, _ = bf16_conv_operands((2, 6, 11, 40, 24, 3, (1, 1), True, False), seed=3)
    args = [mx.array(v) for v in (x, weight, bias)]
    y = prim.bf16_conv3x3(*args)
    assert same_bits(y, prim.bf16_conv(*args, (1, 1)))
    assert relative_error(y, bf16_conv_exact(x, weight, bias, (1, 1), None)) < 1e-6
    assert relative_error(prim.bf16_conv3x3_reference(*args), bf16_conv_exact(x, weight, bias, (1, 1), None)) < 1e-6


@needs_bf16
def test_bf16_conv_as_a_graph_node():
    x, weight, bias, init = (mx.array(v) for v in bf16_conv_operands((2, 12, 10, 48, 40, 3, (1, 1), True, True)))
    built_lazily(lambda: [x, weight, bias, init], lambda *v: prim.bf16_conv(*v[:3], (1, 1), v[3]))
    mx.eval(x, weight, bias, init)
    copies = [np.array(v) for v in (x, weight, bias, init)]
    expected = prim.bf16_conv(x, weight, bias, (1, 1), init)
    mx.eval(expected)
    assert all(same_bits(v, c) for v, c in zip((x, weight, bias, init), copies))  # a held init is not written
    assert same_bits(prim.bf16_conv(x, weight, bias, (1, 1), init * 1.0), expected)  # a fresh one is taken over
    compiled = mx.compile(lambda *v: prim.bf16_conv(*v[:3], (1, 1), v[3]) * 2.0)
    assert same_bits(compiled(x, weight, bias, init), expected * 2.0)
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    with mx.stream(first):
        a = prim.bf16_conv(x, weight, bias, (1, 1), init)
    with mx.stream(second):
        b = prim.bf16_conv(x[:1], weight, bias, (1, 1), init[:1])
    mx.eval(a, b)
    assert same_bits(a, expected) and same_bits(b, expected[:1])
    strided = prim.bf16_conv(x[:, ::2], weight, bias, (1, 1), init[:, ::2])  # inputs made contiguous
    assert relative_error(strided, bf16_conv_exact(np.array(x)[:, ::2], np.array(weight), np.array(bias), (1, 1),
                                                   np.array(init)[:, ::2])) < 1e-6
    # transformations through the plain formula
    grads = mx.grad(lambda *v: prim.bf16_conv(*v[:3], (1, 1), v[3]).sum(), argnums=(0, 1, 2, 3))(x, weight, bias, init)
    plain = mx.grad(lambda *v: prim.bf16_conv_reference(*v[:3], (1, 1), v[3]).sum(),
                    argnums=(0, 1, 2, 3))(x, weight, bias, init)
    assert all(relative_error(g, p) < 1e-5 for g, p in zip(grads, plain))
    batched = mx.vmap(lambda v, i: prim.bf16_conv(v[None], weight, bias, (1, 1), i[None])[0])(x, init)
    assert relative_error(batched, expected) < 1e-6


@needs_bf16
def test_what_the_bf16_conv_does_not_take_it_says():
    x, weight, bias, init = (mx.array(v) for v in bf16_conv_operands((1, 6, 6, 16, 8, 3, (1, 1), True, True)))
    assert prim.bf16_conv_supported(x, weight, bias, (1, 1), init) and prim.bf16_conv3x3_supported(x, weight, bias)
    assert not prim.bf16_conv_supported(x.astype(mx.float16), weight, bias)
    assert not prim.bf16_conv_supported(x, weight, bias.astype(mx.bfloat16))
    assert not prim.bf16_conv_supported(x[..., :12], weight, bias)  # C does not match
    assert not prim.bf16_conv_supported(x, weight, bias[:7])
    assert not prim.bf16_conv_supported(x, weight, bias, (3, 1))  # padding past the kernel: another size
    assert not prim.bf16_conv_supported(x, weight, bias, (1, 1), init[..., :7])
    assert not prim.bf16_conv3x3_supported(x, weight[:, :2, :2], bias)
    with pytest.raises(ValueError, match="padding"):
        prim.bf16_conv(x, weight, bias, (3, 1))


# (B, H, W, C, O): one pixel, maps narrower than a tile, odd channel counts, more rows than a part's,
# the register tile's two chunks of rows
SUBPIXEL_CASES = [(1, 1, 1, 8, 4), (2, 3, 5, 17, 9), (1, 7, 9, 32, 48), (2, 6, 20, 40, 24), (1, 24, 40, 64, 32),
                  (1, 65, 128, 512, 16)]


def subpixel_operands(case, seed: int = 0):
    """NumPy float32 x [B, H, W, C], weights [2, 2, O, 2, 2, C], init [B, 2H, 2W, O]."""
    b, h, w, c, o = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    weights = (rng.standard_normal((2, 2, o, 2, 2, c)) * 0.2).astype(np.float32)
    init = rng.standard_normal((b, 2 * h, 2 * w, o)).astype(np.float32)
    return x, weights, init


def subpixel_exact(x, weights, init) -> np.ndarray:
    """float64: init + parity (a, b)'s conv of the rounded operands at pixels (2y + a, 2x + b)."""
    out = init.astype(np.float64)
    for a in (0, 1):
        for b in (0, 1):
            out[:, a::2, b::2] += bf16_conv_exact(x, weights[a, b], None, (1 - a, 1 - b), None)
    return out


@needs_bf16
@pytest.mark.parametrize("case", SUBPIXEL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_bf16_subpixel_conv_against_float64_and_its_twin(case):
    x, weights, init = subpixel_operands(case, seed=sum(case))
    args = [mx.array(v) for v in (x, weights, init)]
    done = prim.extension().bf16_products_done()
    y = prim.bf16_subpixel_conv(*args)
    assert nodes(y) == {"MobileoBf16SubpixelConv"}
    mx.eval(y)
    assert prim.extension().bf16_products_done() == done + 4  # one product per parity
    exact = subpixel_exact(x, weights, init)
    tolerance = 1e-6 if 4 * case[3] <= 1152 else 3e-6  # float32 sums over K = 4 C
    assert y.shape == exact.shape
    assert relative_error(y, exact) < tolerance
    assert relative_error(prim.bf16_subpixel_conv_reference(*args), exact) < tolerance
    # each parity the bf16_conv node's product, stored into its pixels
    for a in (0, 1):
        for b in (0, 1):
            parity = prim.bf16_conv(args[0], args[1][a, b], None, (1 - a, 1 - b), args[2][:, a::2, b::2])
            assert relative_error(y[:, a::2, b::2], parity) < 1e-6


@needs_bf16
def test_bf16_subpixel_conv_as_a_graph_node():
    x, weights, init = (mx.array(v) for v in subpixel_operands((2, 5, 6, 24, 16), seed=2))
    built_lazily(lambda: [x, weights, init], prim.bf16_subpixel_conv)
    mx.eval(x, weights, init)
    copies = [np.array(v) for v in (x, weights, init)]
    expected = prim.bf16_subpixel_conv(x, weights, init)
    mx.eval(expected)
    assert all(same_bits(v, c) for v, c in zip((x, weights, init), copies))  # a held init is not written
    assert same_bits(prim.bf16_subpixel_conv(x, weights, init * 1.0), expected)  # a fresh one is taken over
    compiled = mx.compile(lambda *v: prim.bf16_subpixel_conv(*v) * 2.0)
    assert same_bits(compiled(x, weights, init), expected * 2.0)
    grads = mx.grad(lambda *v: prim.bf16_subpixel_conv(*v).sum(), argnums=(0, 1, 2))(x, weights, init)
    plain = mx.grad(lambda *v: prim.bf16_subpixel_conv_reference(*v).sum(), argnums=(0, 1, 2))(x, weights, init)
    assert all(relative_error(g, p) < 1e-5 for g, p in zip(grads, plain))
    assert prim.bf16_subpixel_conv_supported(x, weights, init)
    assert not prim.bf16_subpixel_conv_supported(x, weights, init[:, 1:])
    assert not prim.bf16_subpixel_conv_supported(x[..., :20], weights, init)
    assert not prim.bf16_subpixel_conv_supported(x, weights[:, :, :, :, :1], init)
    with pytest.raises(ValueError, match="init"):
        prim.bf16_subpixel_conv(x, weights, init[:, 1:])

