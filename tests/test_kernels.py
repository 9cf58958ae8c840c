"""Custom kernels (kernels/) against their plain-MLX twins and references, and the backend
forms that call them (mobileo_mlx.backends).

* On Linux every Metal kernel body runs through the emulator (tests/mslemu): the Metal forms
  the seam swaps in (``backends.metal``) run as on a Mac (backend patched to "metal", the
  kernels built with ``mslemu.metal_kernel``), over shapes that stress the edges and in
  f32/f16/bf16; a subset also runs under every schedule (races) and the sanitizer.
* On macOS with Metal the same tests run the real kernels on the GPU.
* The CPU twins (shift-and-add) are checked against ``mx.conv2d``, and the CPU forms' splits
  over two streams against the unsplit computation.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mobileo_mlx import backends, platform
from mobileo_mlx.backends import metal as metal_forms
from mobileo_mlx.backends.cpu import layers, streams
from mobileo_mlx.kernels import depthwise as dw, linear_attention as la, metal
from mobileo_mlx.models import common, sana

ON_MAC = sys.platform == "darwin" and mx.metal.is_available()
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}  # max|err| / max|ref| (emulator: ~1e-7 in f32)

if not ON_MAC:
    from tests import mslemu


@pytest.fixture
def metal_dispatch(monkeypatch):
    """The seam as on Metal. On Linux the kernels are built with the emulator."""
    if ON_MAC:
        yield None
        return
    monkeypatch.setattr(platform, "backend", lambda: "metal")
    monkeypatch.setattr(metal, "_metal", _emulated())
    monkeypatch.delenv(backends.KERNELS_ENV, raising=False)
    with mslemu.record() as calls:
        yield calls


_EMU = None


def _emulated():
    global _EMU
    if _EMU is None:
        _EMU = metal.MetalKernels(mslemu.metal_kernel)
    return _EMU


def _rand(shape, dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _f32(a):
    return a.astype(mx.float32)


def _rel_err(out, ref) -> float:
    o, r = np.asarray(_f32(out)), np.asarray(_f32(ref))
    assert o.shape == r.shape
    assert np.isfinite(o).all(), "non-finite values in the kernel output"
    return float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))


def _kernel_names(calls):
    return [] if calls is None else [c["kernel"] for c in calls]


def _conv(weight, bias=None, stride=1, padding=None, dims=2):
    """A plain depthwise conv module holding ``weight`` / ``bias``."""
    out, k = weight.shape[0], weight.shape[1]
    module = common.DepthwiseConv(out, out, k, stride, padding, bias is not None, dims)
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


def _fast(module, component="vision"):
    """``module`` with the current backend's forms swapped in (a new object when it is one)."""
    return backends.accelerate(module, component)


# ---------------------------------------------------------------------------
# Depthwise convolutions, through the Metal forms
# ---------------------------------------------------------------------------
# (id, x shape, channel multiplier, kernel, stride, bias, dtypes)
CONV2D_CASES = [
    ("fastvit_convffn_7x7", (1, 17, 23, 24), 1, 7, 1, False, DTYPES),
    ("fastvit_repcpe_7x7_bias", (2, 10, 9, 16), 1, 7, 1, True, [mx.float32]),
    ("fastvit_down_7x7_s2_m2", (2, 17, 15, 12), 2, 7, 2, True, DTYPES),
    ("fastvit_stem_3x3_s2", (1, 16, 13, 8), 1, 3, 2, True, [mx.float32]),
    ("fastvit_conv_exp_3x3_m2", (1, 6, 7, 16), 2, 3, 1, True, [mx.bfloat16]),
    ("dcae_litemla_5x5", (1, 11, 9, 48), 1, 5, 1, False, DTYPES),
    ("dcae_3x3_bias_odd_channels", (1, 8, 5, 33), 1, 3, 1, True, [mx.float16]),
]
CONV2D_PARAMS = [pytest.param(shape, m, k, s, b, dt, id=f"{name}-{dt}".replace("mlx.core.", ""))
                 for name, shape, m, k, s, b, dts in CONV2D_CASES for dt in dts]


@pytest.mark.parametrize("shape,mult,k,stride,has_bias,dtype", CONV2D_PARAMS)
def test_depthwise_conv2d_kernel(metal_dispatch, shape, mult, k, stride, has_bias, dtype):
    C = shape[-1]
    x = _rand(shape, dtype, 0)
    w = _rand((C * mult, k, k, 1), dtype, 1, 0.3)
    b = _rand((C * mult,), dtype, 2) if has_bias else None
    conv = _fast(_conv(w, b, stride))
    assert isinstance(conv, metal_forms.DepthwiseConv) or ON_MAC
    out = conv(x)
    ref = dw.reference(_f32(x), _f32(w), None if b is None else _f32(b), stride, k // 2)
    twin = dw.shift_add(x, w, b, stride, k // 2)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype] and _rel_err(out, twin) < TOL[dtype]
    if not ON_MAC:
        assert _kernel_names(metal_dispatch) and all("mobileo_dwconv" in n for n in _kernel_names(metal_dispatch))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("mlx.core.", ""))
def test_glu_depthwise_conv2d_kernel(metal_dispatch, dtype):
    """SANA / DC-AE GLUMBConv's middle: depthwise 3x3 + bias over 2C channels, then a * SiLU(g)."""
    x = _rand((2, 9, 13, 40), dtype, 3, 2.0)
    w = _rand((40, 3, 3, 1), dtype, 4, 0.5)
    b = _rand((40,), dtype, 5)
    out = dw.metal_glu(x, w, b)
    ref = dw.glu_reference(_f32(x), _f32(w), _f32(b))
    assert out.shape == (2, 9, 13, 20) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype]
    if not ON_MAC:
        assert _kernel_names(metal_dispatch) and all("dwconv_glu" in n for n in _kernel_names(metal_dispatch))


@pytest.mark.parametrize("norm_type, residual", [(None, False), ("rms_norm", True)], ids=["sana", "dcae"])
def test_glumbconv_on_metal_runs_the_glu_kernel(metal_dispatch, norm_type, residual):
    """GLUMBConv's Metal form (SANA's, and the DC-AE's with its norm and residual) fuses its gated
    depthwise conv into one kernel launch and matches the plain module."""
    plain = sana.GLUMBConv(24, 24, 2.5, norm_type=norm_type, residual_connection=residual)
    plain.update(tree_unflatten([(k, _rand(v.shape, mx.float32, i, 0.3))
                                 for i, (k, v) in enumerate(tree_flatten(plain.parameters()))]))
    x = _rand((2, 5, 7, 24), mx.float32, 99)
    expected = plain(x)
    fast = _fast(plain, "dit")
    assert isinstance(fast, metal_forms.GLUMBConv) or ON_MAC
    assert _rel_err(fast(x), expected) < TOL[mx.float32]
    if not ON_MAC:
        assert [n for n in _kernel_names(metal_dispatch) if "dwconv" in n] and all(
            "dwconv_glu" in n for n in _kernel_names(metal_dispatch))


@pytest.mark.parametrize("L,C,dtype", [(77, 40, mx.float32), (77, 40, mx.float16), (77, 40, mx.bfloat16),
                                       (3, 512, mx.float32), (1000, 72, mx.float32)])
def test_depthwise_conv1d_kernel(metal_dispatch, L, C, dtype):
    """MCP sequence refiner: depthwise conv1d, k=3, pad 1, no bias."""
    x = _rand((2, L, C), dtype, 6)
    w = _rand((C, 3, 1), dtype, 7, 0.5)
    out = _fast(_conv(w, dims=1), "mcp")(x)
    ref = mx.conv1d(_f32(x), _f32(w), padding=1, groups=C)
    twin = dw.shift_add(x[:, None], w[:, None], None, 1, (0, 1))[:, 0]
    assert out.shape == (2, L, C) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype] and _rel_err(out, twin) < TOL[dtype]


@pytest.mark.skipif(ON_MAC, reason="schedules and the sanitizer are emulator checks (Linux)")
def test_depthwise_kernels_race_free_and_in_bounds(metal_dispatch):
    x = _rand((2, 9, 7, 6), mx.float32, 8)
    w = _rand((12, 7, 7, 1), mx.float32, 9)
    b = _rand((12,), mx.float32, 10)
    xg = _rand((1, 5, 6, 10), mx.float16, 11)
    wg = _rand((10, 3, 3, 1), mx.float16, 12)
    bg = _rand((10,), mx.float16, 13)

    def run():
        return [dw.metal(x, w, b, stride=2), dw.metal_glu(xg, wg, bg)]

    mslemu.check_schedules(run)
    with mslemu.settings(sanitize=True):
        out = run()
    assert _rel_err(out[0], dw.reference(x, w, b, 2, 3)) < TOL[mx.float32]


# ---------------------------------------------------------------------------
# ReLU linear attention
# ---------------------------------------------------------------------------
LA_CASES = [
    # id, B, H, NQ, NK, D, DV, dtypes
    ("sana_256", 2, 3, 256, 256, 32, 32, DTYPES),
    ("long_1100", 1, 2, 1100, 1100, 32, 32, [mx.float32, mx.float16]),
    ("cross_77_300", 2, 2, 77, 300, 32, 32, [mx.float32]),
    ("d16_dv40", 1, 3, 70, 70, 16, 40, [mx.float32]),
    ("d48_dv24", 1, 1, 33, 129, 48, 24, [mx.bfloat16]),
]
LA_PARAMS = [pytest.param(*c[1:7], dt, id=f"{c[0]}-{dt}".replace("mlx.core.", "")) for c in LA_CASES for dt in c[7]]


@pytest.mark.parametrize("B,H,NQ,NK,D,DV,dtype", LA_PARAMS)
def test_relu_linear_attention_kernel(metal_dispatch, B, H, NQ, NK, D, DV, dtype):
    q = _rand((B, H, NQ, D), dtype, 20)
    k = _rand((B, H, NK, D), dtype, 21)
    v = _rand((B, H, NK, DV), dtype, 22)
    out = _fast(common.ReLULinearAttention(1e-15), "dit")(q, k, v)
    ref = common.relu_linear_attention(_f32(q), _f32(k), _f32(v), 1e-15)
    twin = common.relu_linear_attention(q, k, v, 1e-15)  # the twin, in the input dtype
    assert out.shape == (B, H, NQ, DV) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype] and _rel_err(out, twin) < TOL[dtype]
    if not ON_MAC:
        assert [n.split("__")[0] for n in _kernel_names(metal_dispatch)] == [
            "custom_kernel_mobileo_linattn_kv", "custom_kernel_mobileo_linattn_out"]


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=lambda d: str(d).replace("mlx.core.", ""))
def test_linear_attention_reads_litemla_and_sana_layouts_without_copies(metal_dispatch, dtype):
    """LiteMLA: [B, N, 2heads * 3 * d] interleaved (q|k|v per head) -> strided [B, heads, N, d] views;
    SANA: [B, N, heads * d] -> transposed views. The kernel reads them through their strides."""
    B, N, heads, d = 1, 300, 4, 32
    qkv = _rand((B, N, heads * 3 * d), dtype, 30).reshape(B, N, heads, 3, d)
    q, k, v = (qkv[:, :, :, i, :].transpose(0, 2, 1, 3) for i in range(3))
    out = la.metal(q, k, v, 1e-15)
    ref = common.relu_linear_attention(_f32(q), _f32(k), _f32(v), 1e-15)
    assert _rel_err(out, ref) < TOL[dtype]
    s = _rand((B, N, heads * d), dtype, 31).reshape(B, N, heads, d).transpose(0, 2, 1, 3)
    out2 = la.metal(s, s, s, 1e-15)
    assert _rel_err(out2, common.relu_linear_attention(_f32(s), _f32(s), _f32(s), 1e-15)) < TOL[dtype]


def test_linear_attention_all_negative_keys_give_zero(metal_dispatch):
    q = _rand((1, 2, 40, 32), mx.float32, 40)
    k = -mx.abs(_rand((1, 2, 50, 32), mx.float32, 41))
    v = _rand((1, 2, 50, 32), mx.float32, 42)
    out = la.metal(q, k, v, 1e-15)
    assert np.array_equal(np.asarray(out), np.zeros((1, 2, 40, 32), np.float32))


def test_linear_attention_shapes_beyond_the_kernel_fall_back_to_the_twin(metal_dispatch):
    q = _rand((1, 1, 20, 200), mx.float32, 45)  # d + d_v too large to stage 32 rows in threadgroup memory
    v = _rand((1, 1, 20, 20), mx.float32, 46)
    assert not la.metal_supported(q, q, v)
    out = _fast(common.ReLULinearAttention(1e-15), "dit")(q, q, v)
    assert _rel_err(out, common.relu_linear_attention(q, q, v, 1e-15)) == 0.0
    assert _kernel_names(metal_dispatch) == []


@pytest.mark.skipif(ON_MAC, reason="schedules and the sanitizer are emulator checks (Linux)")
def test_linear_attention_kernels_race_free_and_in_bounds(metal_dispatch):
    B, N, heads, d = 1, 300, 2, 32
    qkv = _rand((B, N, heads * 3 * d), mx.float32, 50).reshape(B, N, heads, 3, d)
    q, k, v = (qkv[:, :, :, i, :].transpose(0, 2, 1, 3) for i in range(3))
    out = mslemu.check_schedules(lambda: la.metal(q, k, v, 1e-15))
    with mslemu.settings(sanitize=True):
        out_san = la.metal(q, k, v, 1e-15)
    ref = common.relu_linear_attention(q, k, v, 1e-15)
    assert _rel_err(out, ref) < TOL[mx.float32] and _rel_err(out_san, ref) < TOL[mx.float32]


# ---------------------------------------------------------------------------
# Which forms the seam swaps in
# ---------------------------------------------------------------------------
@pytest.mark.skipif(ON_MAC, reason="patches the backend; on a Mac the real dispatch is exercised above")
def test_environment_switch_forces_the_twin_on_metal(metal_dispatch, monkeypatch):
    x = _rand((1, 6, 6, 8), mx.float32, 60)
    w = _rand((8, 3, 3, 1), mx.float32, 61)
    q = _rand((1, 2, 10, 32), mx.float32, 62)
    conv, attention = _fast(_conv(w)), _fast(common.ReLULinearAttention(1e-15), "dit")
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")
    assert np.array_equal(np.array(conv(x)), np.array(dw.reference(x, w)))
    attention(q, q, q)
    assert metal_dispatch == []  # no kernel launched
    monkeypatch.setenv(backends.KERNELS_ENV, "bogus")
    with pytest.raises(ValueError, match="MOBILEO_MLX_KERNELS"):
        conv(x)
    monkeypatch.setenv(backends.KERNELS_ENV, "auto")
    conv(x)
    assert len(metal_dispatch) == 1
    monkeypatch.setenv(backends.KERNELS_ENV, "reference")
    assert type(_fast(_conv(w))) is common.DepthwiseConv  # the plain module, untouched


def test_cpu_and_cuda_never_reach_the_metal_kernels(monkeypatch):
    for backend in ("cpu", "cuda"):
        monkeypatch.setattr(platform, "backend", lambda b=backend: b)
        fast = _fast(_conv(_rand((8, 3, 3, 1), mx.float32, 63)))
        assert not isinstance(fast, metal_forms.DepthwiseConv)
        assert isinstance(fast, layers.DepthwiseConv) == (backend == "cpu")


# ---------------------------------------------------------------------------
# CPU: the shift-and-add twin against mx.conv2d, the CPU forms' splits
# ---------------------------------------------------------------------------
TWIN_CASES = [(c[1], c[2], c[3], c[4], c[5]) for c in CONV2D_CASES] + [
    ((2, 16, 16, 64), 1, 3, 1, True), ((1, 8, 8, 8), 1, 7, 2, False)]


@pytest.mark.parametrize("shape,mult,k,stride,has_bias", TWIN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("mlx.core.", ""))
def test_shift_and_add_twin_matches_conv2d(shape, mult, k, stride, has_bias, dtype):
    C = shape[-1]
    x = _rand(shape, dtype, 70)
    w = _rand((C * mult, k, k, 1), dtype, 71, 0.3)
    b = _rand((C * mult,), dtype, 72) if has_bias else None
    twin = dw.shift_add(x, w, b, stride, k // 2)
    ref = dw.reference(_f32(x), _f32(w), None if b is None else _f32(b), stride, k // 2)
    assert twin.dtype == dtype
    assert _rel_err(twin, ref) < TOL[dtype]


@pytest.mark.parametrize("shape,mult,k,stride,has_bias", [((1, 12, 10, 7), 2, 7, 2, True), ((2, 9, 9, 16), 1, 3, 1, False)])
def test_twin_split_over_two_cpu_streams_is_exact(monkeypatch, shape, mult, k, stride, has_bias):
    # Large convs run as two channel halves, one per CPU stream: the same products per
    # channel, so the result is bit-identical to the unsplit twin (odd channel counts and
    # channel multipliers included).
    monkeypatch.setattr(backends.tuning, "DEPTHWISE_SPLIT_MIN_MACS", 1)
    monkeypatch.setenv(backends.KERNELS_ENV, "twin")  # not the native kernel
    pieces = []
    real = streams.cpu_pieces
    monkeypatch.setattr(streams, "cpu_pieces", lambda n, build: pieces.append(n) or real(n, build))
    C = shape[-1]
    x = _rand(shape, mx.float32, 73)
    w = _rand((C * mult, k, k, 1), mx.float32, 74, 0.3)
    b = _rand((C * mult,), mx.float32, 75) if has_bias else None
    split = layers.depthwise_conv2d(x, w, b, (stride, stride), (k // 2, k // 2))
    assert pieces == ([2] if mx.default_device() == mx.cpu else [])
    assert np.array_equal(np.array(split), np.array(dw.shift_add(x, w, b, stride, k // 2)))
    assert _rel_err(split, dw.reference(x, w, b, stride, k // 2)) < 2e-6


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_linear_attention_split_over_two_cpu_streams_is_exact(monkeypatch, batch):
    # On the CPU an even batch runs as two halves, one per stream: the same operations per
    # batch element, so bit-identical to the unsplit computation; an odd batch runs whole.
    monkeypatch.setattr(backends.tuning, "LINEAR_ATTENTION_SPLIT_MIN_ELEMENTS", 1)
    pieces = []
    real = streams.cpu_pieces
    monkeypatch.setattr(streams, "cpu_pieces", lambda n, build: pieces.append(n) or real(n, build))
    q, k, v = (_rand((batch, 3, n, 8), mx.float32, seed) for n, seed in ((10, 30), (7, 31), (7, 32)))
    out = layers.ReLULinearAttention(1e-15)(q, k, v)
    assert np.array_equal(np.array(out), np.array(common.relu_linear_attention(q, k, v, 1e-15)))
    assert pieces == ([] if batch % 2 or mx.default_device() != mx.cpu else [2])


def test_cpu_forms_agree_with_the_reference(monkeypatch):
    x = _rand((2, 12, 10, 32), mx.float32, 80)
    w = _rand((32, 3, 3, 1), mx.float32, 81)
    b = _rand((32,), mx.float32, 82)
    for mode in ("auto", "twin"):
        monkeypatch.setenv(backends.KERNELS_ENV, mode)
        assert _rel_err(layers.DepthwiseConv.__call__(_conv(w, b), x), dw.reference(x, w, b)) < 2e-6
        xs = _rand((2, 41, 24), mx.float32, 83)
        ws = _rand((24, 3, 1), mx.float32, 84)
        for padding in (1, 0):
            got = layers.DepthwiseConv.__call__(_conv(ws, None, 1, padding, dims=1), xs)
            assert _rel_err(got, mx.conv1d(xs, ws, padding=padding, groups=24)) < 2e-6
        wd = _rand((64, 7, 7, 1), mx.float32, 85)
        got = layers.DepthwiseConv.__call__(_conv(wd, None, 2, 3), x)
        assert _rel_err(got, dw.reference(x, wd, None, 2, 3)) < 2e-6
