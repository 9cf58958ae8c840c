"""The native CPU kernel for quantized products of a few rows (kernels.quantized_gemv)
against its twin, MLX's own ``quantized_matmul`` on the same packed weights."""

import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mobileo_mlx.kernels import _native
from mobileo_mlx.kernels import quantized_gemv as gemv
from mobileo_mlx import weights
from mobileo_mlx.weights import DequantizedLinear

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the kernel serves MLX's CPU backend")


def relative_error(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def quantized(outputs: int, inputs: int, bits: int, group_size: int, seed: int = 0):
    w = mx.random.normal((outputs, inputs), key=mx.random.key(seed)) * 0.05
    return mx.quantize(w, group_size=group_size, bits=bits)


def twin(x, packed, scales, biases, bits, group_size):
    return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group_size, bits=bits)


def exact(x, packed, scales, biases, bits, group_size) -> np.ndarray:
    """The product in float64 from the dequantized weight."""
    w = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
    return np.array(x, dtype=np.float64) @ w.T


def assert_close(got, x, packed, scales, biases, bits, group_size):
    """Within float32 summation error of the exact product, and of MLX's own kernel."""
    assert relative_error(got, exact(x, packed, scales, biases, bits, group_size)) < 2e-6
    assert relative_error(got, twin(x, packed, scales, biases, bits, group_size)) < 5e-6


@pytest.fixture
def native_only(monkeypatch):
    """Fail if the call falls back to the twin."""
    def no_fallback(*args):
        raise AssertionError("fell back to mx.quantized_matmul")
    monkeypatch.setattr(gemv, "_twin", no_fallback)


def test_the_kernel_is_built_on_linux():
    if sys.platform.startswith("linux"):
        assert _native.library() is not None, gemv.status()
        assert "native kernel" in gemv.status()


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_matches_mlx_quantized_matmul(bits, group_size, rows, native_only):
    # 1031 outputs (odd: uneven thread slices) x 512 inputs, above the threading threshold.
    packed, scales, biases = quantized(1031, 512, bits, group_size, seed=rows)
    x = mx.random.normal((1, rows, 512), key=mx.random.key(100 + rows))
    assert gemv.supported(x, packed, scales, biases, bits, group_size)
    got = gemv.quantized_gemv(x, packed, scales, biases, bits, group_size)
    assert got.shape == (1, rows, 1031) and got.dtype == mx.float32
    assert_close(got, x, packed, scales, biases, bits, group_size)


@pytest.mark.parametrize("outputs,inputs", [(1, 64), (7, 128), (3000, 896), (896, 4864)])
def test_shapes_of_the_language_model(outputs, inputs, native_only):
    packed, scales, biases = quantized(outputs, inputs, 4, 64)
    x = mx.random.normal((inputs,), key=mx.random.key(3))
    got = gemv.quantized_gemv(x, packed, scales, biases, 4, 64)
    assert got.shape == (outputs,)
    assert_close(got, x, packed, scales, biases, 4, 64)


def test_unsupported_products_run_the_twin():
    packed, scales, biases = quantized(40, 256, 4, 32)  # 4-bit groups of 32: half a vector
    x = mx.random.normal((2, 256), key=mx.random.key(1))
    assert not gemv.supported(x, packed, scales, biases, 4, 32)
    assert mx.array_equal(gemv.quantized_gemv(x, packed, scales, biases, 4, 32), twin(x, packed, scales, biases, 4, 32))
    packed, scales, biases = quantized(40, 256, 4, 64)
    for other in (mx.random.normal((9, 256)), mx.random.normal((2, 256)).astype(mx.bfloat16)):
        assert not gemv.supported(other, packed, scales, biases, 4, 64)
    two, six = quantized(40, 256, 2, 64), quantized(40, 256, 6, 64)
    assert not gemv.supported(x, *two, 2, 64) and not gemv.supported(x, *six, 6, 64)


def test_twin_mode_and_function_transformations_use_mlx(monkeypatch):
    packed, scales, biases = quantized(64, 128, 8, 64)
    x = mx.random.normal((1, 128), key=mx.random.key(2))
    expected = twin(x, packed, scales, biases, 8, 64)
    compiled = mx.compile(lambda v: gemv.quantized_gemv(v, packed, scales, biases, 8, 64))
    assert mx.array_equal(compiled(x), expected)  # no evaluation inside mx.compile: the twin
    monkeypatch.setenv("MOBILEO_MLX_KERNELS", "twin")
    assert not gemv.supported(x, packed, scales, biases, 8, 64)


def test_calls_from_several_threads(native_only):
    packed, scales, biases = quantized(2048, 512, 4, 64)
    xs = [mx.random.normal((1, 512), key=mx.random.key(i)) for i in range(4)]
    expected = [twin(x, packed, scales, biases, 4, 64) for x in xs]
    mx.eval(expected)
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = np.array(gemv.quantized_gemv(xs[i], packed, scales, biases, 4, 64))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert relative_error(got, want) < 5e-6


def test_decoding_layers_use_the_kernel(monkeypatch):
    """A DequantizedLinear (the LM on CPU) takes the kernel for up to 8 rows, the dequantize +
    matmul path above, and both agree with MLX's QuantizedLinear."""
    reference = nn.QuantizedLinear.from_linear(nn.Linear(256, 600), group_size=64, bits=4)
    layer = DequantizedLinear(256, 600, True, 64, 4)
    layer.update(dict(reference.parameters()))
    calls = []
    real = gemv.quantized_gemv
    monkeypatch.setattr(weights.native_gemv, "quantized_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    for rows in (1, 8, 9):
        x = mx.random.normal((1, rows, 256), key=mx.random.key(rows))
        assert relative_error(layer(x), reference(x)) < 5e-6
    assert calls == [(1, 1, 256), (1, 8, 256)]
