"""The element-wise native nodes (native/silu.c as kernels.primitives' silu and glu_silu) and the
CPU forms that take them: each node against the MLX form it replaces, bit for bit, and against
float64; odd sizes and vector tails, batch 1 and 2, strided inputs; what a graph node promises (nothing evaluated
while the graph is built, mx.compile and two streams give the same bits, inputs never written,
transformations through the plain formula); the CPU forms against the plain modules."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mobileo_mlx import backends
from mobileo_mlx.backends.cpu import activations, layers
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.models.language import LanguageConfig, LanguageModel
from tests.test_backends import SMALL_CONFIGS, randomized, rebuild
from tests.test_primitives import built_lazily, relative_error, same_bits

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the graph nodes serve MLX's CPU backend"),
    pytest.mark.skipif(not prim.available(), reason=f"graph nodes {prim.unavailable_reason()}"),
]
NODES = ("MobileoSilu", "MobileoGluSilu")
def nodes(*outputs) -> set[str]:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return {name for name in NODES if f'"{name}"' in dot.getvalue()}


def same_values(got, want) -> bool:
    """Bit for bit but for the sign of a NaN (which MLX's kernels do not define either)."""
    got, want = np.array(got), np.array(want)
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan)) and same_bits(got[~nan], want[~nan])


def normal(shape, seed, scale=1.0, offset=0.0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal(shape) * scale + offset).astype(np.float32))


SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.0, -88.0, 88.5, -88.5, 87.9, -87.3, 1e-30, -1e-30, 1e-45,
                    200.0, -200.0, 1e30, -1e30], np.float32)


def activation_values(shape, seed) -> mx.array:
    x = np.array(normal(shape, seed, scale=8.0)).reshape(-1)
    x[: min(x.size, SPECIAL.size)] = SPECIAL[: x.size]
    return mx.array(x.reshape(shape))


def silu64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


# ----------------------------------------------------------------------------------- SiLU
@pytest.mark.parametrize("shape", [(), (7,), (15,), (17,), (1000, 3), (2, 300, 517), (1, 9, 11, 128)])
def test_silu_is_bit_identical_to_the_mlx_form(shape):
    x = activation_values(shape, seed=len(shape) + 1)
    y = prim.silu(x)
    assert nodes(y) == {"MobileoSilu"} and y.shape == x.shape
    assert same_values(y, activations._silu_whole(x))  # the MLX kernels the CPU form ran


def test_silu_against_float64():
    x = normal((3, 1000, 37), seed=2, scale=20.0)
    got, want = np.array(prim.silu(x), np.float64), silu64(x)
    normal_range = np.array(x) > -87.3  # where sigmoid(x) is a normal float
    assert np.all(np.abs(got - want)[normal_range] <= 3e-7 * np.abs(want)[normal_range] + 1e-38)
    assert relative_error(got, prim.silu_reference(x)) < 1e-6  # the plain formula (nn.silu)


def test_silu_of_views_and_of_a_temporary():
    x = normal((600, 40), seed=3, scale=4.0)
    for view in (x.T, x[::3, 5:], x[:, 3]):
        assert same_bits(prim.silu(view), activations._silu_whole(view))
    assert same_bits(prim.silu(x * 1.0), activations._silu_whole(x))  # its buffer may become the output's


@pytest.mark.parametrize("shape", [(5,), (16,), (33,), (2, 7, 4864), (1, 300, 517)])
def test_glu_silu_is_bit_identical_to_the_mlx_form(shape):
    a = activation_values(shape, seed=4)
    g = activation_values(shape, seed=5)[::-1] if len(shape) == 1 else activation_values(shape, seed=5)
    y = prim.glu_silu(a, g)
    assert nodes(y) == {"MobileoGluSilu"}
    assert same_values(y, activations._glu_silu_whole(a, g))
    finite = normal(shape, seed=6, scale=3.0), normal(shape, seed=7, scale=3.0)
    got = np.array(prim.glu_silu(*finite), np.float64)
    want = np.asarray(finite[0], np.float64) * silu64(finite[1])
    assert np.all(np.abs(got - want) <= 4e-7 * np.abs(want) + 1e-38)
    # a transposed gate is read as the same elements
    if len(shape) == 3:
        column_major = mx.contiguous(g.transpose(2, 1, 0)).transpose(2, 1, 0)
        assert same_values(prim.glu_silu(a, column_major), activations._glu_silu_whole(a, g))


# ------------------------------------------------------------------------- graph behaviour
def node_ops():
    x, g = normal((4, 33, 40), seed=20, scale=3.0), normal((4, 33, 40), seed=21, scale=3.0)
    return [(prim.silu, [x]), (prim.glu_silu, [x, g])]


def test_building_the_nodes_evaluates_nothing():
    for op, inputs in node_ops():
        built_lazily(lambda inputs=inputs: list(inputs), op)


def test_compile_streams_and_inputs_never_written():
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    for op, inputs in node_ops():
        mx.eval(inputs)
        copies = [np.array(v) for v in inputs]
        expected = op(*inputs)
        mx.eval(expected)
        assert all(same_bits(v, c) for v, c in zip(inputs, copies))
        compiled = mx.compile(lambda *v, op=op: op(*v) * 2.0)
        assert same_bits(compiled(*inputs), expected * 2.0)
        with mx.stream(first):
            a = op(*inputs)
        with mx.stream(second):
            b = op(*inputs)
        mx.eval(a, b)
        assert same_bits(a, expected) and same_bits(b, expected)


def test_gradients_and_vmap_go_through_the_plain_formula():
    references = [prim.silu_reference, prim.glu_silu_reference]
    for (op, inputs), reference in zip(node_ops(), references):
        argnums = tuple(range(len(inputs)))
        got = mx.grad(lambda *v, op=op: (op(*v) * v[0]).sum(), argnums=argnums)(*inputs)
        want = mx.grad(lambda *v, f=reference: (f(*v) * v[0]).sum(), argnums=argnums)(*inputs)
        assert all(relative_error(g, w) < 1e-5 for g, w in zip(got, want))
        tangent = mx.jvp(op, inputs, [mx.ones_like(v) for v in inputs])[1][0]
        assert relative_error(tangent, mx.jvp(reference, inputs, [mx.ones_like(v) for v in inputs])[1][0]) < 1e-5
    x = normal((6, 50), seed=25, scale=3.0)
    assert same_bits(mx.vmap(prim.silu, in_axes=1)(x), activations._silu_whole(x).T)


def test_what_the_nodes_do_not_take_they_say():
    x = normal((2, 5, 24), seed=30)
    assert not prim.silu_supported(x.astype(mx.float16)) and not prim.silu_supported(mx.zeros((0, 3)))
    assert prim.glu_silu_supported(x, x) and not prim.glu_silu_supported(x, x[:1])  # broadcast gate: MLX form
    for call in (lambda: prim.glu_silu(x, x[:1]), lambda: prim.silu(x.astype(mx.float16))):
        with pytest.raises(ValueError):
            call()


# --------------------------------------------------------------------------------- CPU forms
def run_modes(monkeypatch, build):
    """build() under MOBILEO_MLX_KERNELS=auto and =twin: (auto's output, twin's output)."""
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    auto = build()
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    twin = build()
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    return auto, twin


def test_silu_and_the_gate_of_the_cpu_forms_take_the_nodes(monkeypatch):
    x = normal((2, 9, 11, 64), seed=40, scale=4.0)
    auto, twin = run_modes(monkeypatch, lambda: layers.SiLU()(x))
    assert nodes(auto) == {"MobileoSilu"} and not nodes(twin) and same_bits(auto, twin)
    assert relative_error(auto, nn.silu(x)) < 1e-6
    # inside a two-stream piece the MLX kernels run (the other stream holds the other piece)
    pieces = layers.streams.cpu_pieces(2, lambda i: activations.silu(x[i]))
    assert not nodes(*pieces) and all(same_bits(p, auto[i]) for i, p in enumerate(pieces))
    assert not nodes(activations.silu(x.astype(mx.float16)))
    config = LanguageConfig(**SMALL_CONFIGS["language"])
    plain = randomized(LanguageModel(config), seed=4, scale=0.2)
    fast = backends.accelerate(rebuild(plain), "language")
    ids = mx.array([[5, 17, 3, 99, 42, 7, 7, 1]])
    auto, twin = run_modes(monkeypatch, lambda: fast(ids))
    assert "MobileoGluSilu" in nodes(auto) and not nodes(twin) and same_bits(auto, twin)
    assert relative_error(auto, plain(ids)) < 1e-5


def test_without_the_extension_the_cpu_forms_run_their_mlx_forms(monkeypatch):
    x = normal((2, 6, 5, 40), seed=60, scale=4.0)
    with_nodes = layers.SiLU()(x)
    monkeypatch.setattr(prim, "_extension", None)
    monkeypatch.setattr(prim, "_error", "not built (simulated)")
    without = layers.SiLU()(x)
    assert not nodes(without) and same_bits(without, with_nodes)
    assert not nodes(activations.glu_silu(x, x))
