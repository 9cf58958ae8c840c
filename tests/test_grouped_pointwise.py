"""The grouped 1x1 conv node (native/grouped_pointwise.c as kernels.primitives.grouped_pointwise) and
the DC-AE's CPU form that takes it: against its plain-MLX twin and float64 for every tail of its
eight-row blocks, batch 1 and 2, group sizes 16 to 64; built lazily, its inputs never written;
what it does not take, it says; the LiteMLA of the decoder takes it at full-size shapes."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx import backends
from mobileo_mlx.backends import tuning
from mobileo_mlx.backends.cpu import layers
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.models import dcae
from tests.test_backends import randomized, rebuild
from tests.test_primitives import built_lazily, relative_error

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(not prim.available(), reason=f"graph nodes {prim.unavailable_reason()}"),
]


def operands(shape, groups: int, seed: int):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    weight = (rng.standard_normal((channels, channels // groups)) * 0.2).astype(np.float32)
    return x, weight


def exact(x, weight, groups: int) -> np.ndarray:
    size = x.shape[-1] // groups
    rows = x.astype(np.float64).reshape(-1, groups, size)
    w = weight.astype(np.float64).reshape(groups, size, size)  # [g, out, in]
    return np.einsum("pgi,goi->pgo", rows, w).reshape(x.shape)


def has_node(y) -> bool:
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    return '"MobileoGroupedPointwise"' in dot.getvalue()


@pytest.mark.parametrize("shape,groups", [((1, 3, 3, 32), 2), ((2, 5, 7, 96), 3), ((1, 8, 8, 192), 6),
                                          ((2, 9, 4, 128), 2), ((1, 1, 1, 64), 4), ((1, 17, 3, 48), 3)],
                         ids=["9 rows", "batch 2, 35 rows", "size 32", "size 64", "one row", "size 16"])
def test_grouped_pointwise_against_its_twin_and_float64(shape, groups):
    x, weight = operands(shape, groups, seed=sum(shape) + groups)
    got = prim.grouped_pointwise(mx.array(x), mx.array(weight), groups)
    assert has_node(got) and got.shape == x.shape
    want = exact(x, weight, groups)
    assert relative_error(got, want) < 1e-6
    assert relative_error(got, prim.grouped_pointwise_reference(mx.array(x), mx.array(weight), groups)) < 1e-6


def test_grouped_pointwise_builds_lazily_and_never_writes_its_inputs():
    x, weight = operands((2, 6, 6, 64), 2, seed=3)
    built_lazily(lambda: [mx.array(x), mx.array(weight)], lambda a, w: prim.grouped_pointwise(a, w, 2))
    a, w = mx.array(x), mx.array(weight)
    mx.eval(prim.grouped_pointwise(a, w, 2))
    assert np.array_equal(np.array(a), x) and np.array_equal(np.array(w), weight)


def test_what_the_grouped_node_does_not_take_it_says():
    x, weight = (mx.array(v) for v in operands((1, 4, 4, 96), 4, seed=5))  # groups of 24: not whole vectors
    assert not prim.grouped_pointwise_supported(x, weight, 4)
    assert not prim.grouped_pointwise_supported(x, weight[:, :16], 4)  # not [C, C / groups]
    x, weight = (mx.array(v) for v in operands((1, 4, 4, 256), 2, seed=6))  # groups of 128: too wide
    assert not prim.grouped_pointwise_supported(x, weight, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        prim.grouped_pointwise(x, weight, 2)


def test_the_decoder_cpu_form_takes_the_node_above_its_threshold(monkeypatch):
    plain = randomized(dcae.GroupedPointwise(96, 3), seed=7, scale=0.3)
    fast = backends.accelerate(rebuild(plain), "vae")
    assert type(fast) is layers.GroupedPointwise
    x = mx.array(operands((2, 5, 5, 96), 3, seed=8)[0])
    assert not has_node(fast(x))  # the demo model's sizes stay the MLX form
    monkeypatch.setattr(tuning, "GROUPED_POINTWISE_NATIVE_MIN_MACS", 0)
    got = fast(x)
    assert has_node(got) and relative_error(got, plain(x)) < 1e-6
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    assert not has_node(fast(x))
