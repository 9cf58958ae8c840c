"""The native CPU depthwise conv (kernels/native/depthwise.c via kernels.depthwise) against
the plain reference (mx.conv2d with groups = channels)."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx.kernels import _native
from mobileo_mlx.kernels import depthwise as dw
from mobileo_mlx import platform

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu or _native.library() is None,
                                reason="the native kernels serve MLX's CPU backend (and must be built)")


def rel_err(a, b) -> float:
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def every_size(monkeypatch):
    monkeypatch.setattr(dw, "NATIVE_MIN_MACS", 0)


def case(shape, k, seed, bias=True):
    key = mx.random.key(seed)
    x = mx.random.normal(shape, key=key)
    w = mx.random.normal((shape[-1], k, k, 1), key=mx.random.key(seed + 1)) * 0.3
    b = mx.random.normal((shape[-1],), key=mx.random.key(seed + 2)) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,k,stride,padding,bias", [
    ((1, 20, 18, 16), 3, 1, 1, True),      # RepMixer-like
    ((2, 17, 13, 24), 7, 1, 3, False),     # ConvFFN / RepCPE-like, a batch, odd sizes
    ((1, 33, 31, 8), 5, 2, 2, True),       # stride 2
    ((1, 12, 12, 8), 3, 1, 0, True),       # no padding: a smaller output
    ((1, 9, 10, 40), 7, 2, 3, True),       # output rows and columns not multiples of 4
])
def test_matches_the_reference(shape, k, stride, padding, bias, every_size):
    x, w, b = case(shape, k, seed=sum(shape) + k)
    native = dw._native2d(x, w, b, (stride, stride), (padding, padding))
    assert native is not None
    expected = dw.depthwise_conv2d_reference(x, w, b, stride, padding)
    assert native.shape == expected.shape
    assert rel_err(native, expected) < 2e-6
    # and the public function takes it
    assert rel_err(dw.depthwise_conv2d(x, w, b, stride=stride, padding=padding), expected) < 2e-6


def test_the_input_is_left_alone_and_outputs_are_fresh(every_size):
    x, w, b = case((1, 16, 16, 16), 3, seed=5)
    before = np.array(x)
    first = dw._native2d(x, w, b, (1, 1), (1, 1))
    second = dw._native2d(x * 2.0, w, b, (1, 1), (1, 1))
    assert np.array_equal(np.array(x), before)
    assert rel_err(second - b, 2.0 * (first - b)) < 1e-6  # two results, two buffers


def test_other_convs_take_the_twin(every_size):
    x, w, b = case((1, 12, 12, 12), 3, seed=7)  # 12 channels: not whole vectors
    assert dw._native2d(x, w, b, (1, 1), (1, 1)) is None
    x8, _, _ = case((1, 12, 12, 8), 3, seed=8)
    w2 = mx.random.normal((16, 3, 3, 1), key=mx.random.key(9))  # channel multiplier 2
    assert dw._native2d(x8, w2, None, (1, 1), (1, 1)) is None
    assert dw._native2d(x8.astype(mx.float16), mx.ones((8, 3, 3, 1)), None, (1, 1), (1, 1)) is None
    w8 = mx.ones((8, 3, 3, 1))
    inside = []
    platform.cpu_pieces(2, lambda i: inside.append(dw._native2d(x8, w8, None, (1, 1), (1, 1))) or mx.zeros(1))
    assert inside == [None, None]  # inside a piece of cpu_pieces: no evaluation, the twin


def test_inside_mx_compile_the_twin_runs(every_size):
    x, w, b = case((1, 12, 12, 8), 3, seed=11)
    compiled = mx.compile(lambda v: dw.depthwise_conv2d(v, w, b))
    assert rel_err(compiled(x), dw.depthwise_conv2d_reference(x, w, b, 1, 1)) < 2e-6
