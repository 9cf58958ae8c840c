"""The native CPU GELU (kernels.gelu) against its twin, models.activations' MLX form:
the same algorithm, so the same bits."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx.kernels import gelu as native
from mobileo_mlx.models import activations

pytestmark = pytest.mark.skipif(not native.supported(mx.zeros((native.MIN_VALUES,))),
                                reason="the native kernels serve MLX's CPU backend (and must be built)")


def values(count: int, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(count) * 4).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 13.28125, -13.28125, 13.3, -13.3, -40.0, 40.0,
                        1e-30, -1e-30, 1e-45, -3.0, 3.0], np.float32)
    x[: special.size] = special
    return mx.array(x)


def same_bits(a, b) -> bool:
    a, b = np.array(a), np.array(b)
    return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


@pytest.mark.parametrize("count", [native.MIN_VALUES, native.MIN_VALUES + 5, 3 * native.MIN_VALUES + 7])
def test_bit_identical_to_the_mlx_form_in_place(count):
    x = values(count, seed=count)
    expected = activations.gelu_fast(x)
    mx.eval(expected)
    y = activations.gelu(x, overwrite=True)
    assert y is x  # the result lives in the input's buffer
    assert same_bits(y, expected)


def test_without_overwrite_the_input_is_untouched():
    x = values(native.MIN_VALUES)
    before = np.array(x)
    y = activations.gelu(x)
    assert y is not x and same_bits(x, before)
    assert same_bits(y, activations.gelu_fast(mx.array(before)))


def test_other_inputs_take_the_mlx_form():
    small = values(1000)
    assert not native.supported(small)
    assert same_bits(activations.gelu(small, overwrite=True), activations.gelu_fast(small))
    half = values(native.MIN_VALUES).astype(mx.float16)
    assert not native.supported(half)
    assert activations.gelu(half, overwrite=True).dtype == mx.float16
    compiled = mx.compile(lambda v: activations.gelu(v * 1.0, overwrite=True))  # no evaluation inside
    x = values(native.MIN_VALUES)
    assert same_bits(compiled(x), activations.gelu_fast(x))


def test_a_layer_output_through_fastvit_gelu():
    """FastViTHD's call sites hand over their layer outputs: the same result as the MLX form,
    and the layer's input is left alone."""
    from mobileo_mlx.models import fastvit

    x = values(native.MIN_VALUES).reshape(1, 64, 64, -1)
    before = np.array(x)
    y = fastvit.gelu(x * 2.0)
    assert same_bits(x, before)
    assert same_bits(y, activations.gelu_fast(mx.array(before) * 2.0))
