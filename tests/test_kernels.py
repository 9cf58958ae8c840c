"""Custom kernels (kernels/) against their plain-MLX twins and references.

* On Linux every Metal kernel body runs through the emulator (tests/mslemu): the public
  functions models call are dispatched as on a Mac (backend patched to "metal", the
  kernels built with ``mslemu.metal_kernel``), over shapes that stress the edges and
  in f32/f16/bf16; a subset also runs under every schedule (races) and the sanitizer.
* On macOS with Metal the same tests run the real kernels on the GPU.
* The CPU twins (shift-and-add) are checked against ``mx.conv2d``/``mx.conv1d``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlx.core as mx

from mobileo_mlx.kernels.depthwise import depthwise_conv1d, depthwise_conv2d, glu_depthwise_conv2d
from mobileo_mlx.kernels.linear_attention import relu_linear_attention
from mobileo_mlx.kernels import _dispatch, depthwise as dw, linear_attention as la, metal

ON_MAC = sys.platform == "darwin" and mx.metal.is_available()
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}  # max|err| / max|ref| (emulator: ~1e-7 in f32)

if not ON_MAC:
    from tests import mslemu


@pytest.fixture
def metal_dispatch(monkeypatch):
    """Dispatch exactly as on Metal. On Linux the kernels are built with the emulator."""
    if ON_MAC:
        yield None
        return
    monkeypatch.setattr(_dispatch.platform, "backend", lambda: "metal")
    monkeypatch.setattr(metal, "_metal", _emulated())
    monkeypatch.delenv(_dispatch.ENV, raising=False)
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


# ---------------------------------------------------------------------------
# Depthwise convolutions, through the public functions
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
    out = depthwise_conv2d(x, w, b, stride=stride)
    ref = dw.depthwise_conv2d_reference(_f32(x), _f32(w), None if b is None else _f32(b), stride, k // 2)
    twin = dw._twin2d(x, w, b, (stride, stride), (k // 2, k // 2), "plain" if b is None else "bias")
    assert out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype] and _rel_err(out, twin) < TOL[dtype]
    if not ON_MAC:
        assert _kernel_names(metal_dispatch) and all("mobileo_dwconv" in n for n in _kernel_names(metal_dispatch))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("mlx.core.", ""))
def test_glu_depthwise_conv2d_kernel(metal_dispatch, dtype):
    """SANA / DC-AE GLUMBConv: depthwise 3x3 + bias over 2C channels, then a * SiLU(g)."""
    x = _rand((2, 9, 13, 40), dtype, 3, 2.0)
    w = _rand((40, 3, 3, 1), dtype, 4, 0.5)
    b = _rand((40,), dtype, 5)
    out = glu_depthwise_conv2d(x, w, b)
    ref = dw.glu_depthwise_conv2d_reference(_f32(x), _f32(w), _f32(b))
    twin = dw._twin2d(x, w, b, (1, 1), (1, 1), "glu")
    assert out.shape == (2, 9, 13, 20) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype] and _rel_err(out, twin) < TOL[dtype]
    if not ON_MAC:
        assert _kernel_names(metal_dispatch) == [n for n in _kernel_names(metal_dispatch) if "dwconv_glu" in n]


@pytest.mark.parametrize("L,C,dtype", [(77, 40, mx.float32), (77, 40, mx.float16), (77, 40, mx.bfloat16),
                                       (3, 512, mx.float32), (1000, 72, mx.float32)])
def test_depthwise_conv1d_kernel(metal_dispatch, L, C, dtype):
    """MCP sequence refiner: depthwise conv1d, k=3, pad 1, no bias."""
    x = _rand((2, L, C), dtype, 6)
    w = _rand((C, 3, 1), dtype, 7, 0.5)
    out = depthwise_conv1d(x, w)
    ref = dw.depthwise_conv1d_reference(_f32(x), _f32(w))
    twin = dw._twin2d(x[:, None], w[:, None], None, (1, 1), (0, 1), "plain")[:, 0]
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
        return [depthwise_conv2d(x, w, b, stride=2), glu_depthwise_conv2d(xg, wg, bg)]

    mslemu.check_schedules(run)
    with mslemu.settings(sanitize=True):
        out = run()
    assert _rel_err(out[0], dw.depthwise_conv2d_reference(x, w, b, 2, 3)) < TOL[mx.float32]


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
    out = relu_linear_attention(q, k, v)
    ref = la.relu_linear_attention_reference(_f32(q), _f32(k), _f32(v))
    twin = la.relu_linear_attention_reference(q, k, v)  # the twin, in the input dtype
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
    out = relu_linear_attention(q, k, v)
    ref = la.relu_linear_attention_reference(_f32(q), _f32(k), _f32(v))
    assert _rel_err(out, ref) < TOL[dtype]
    s = _rand((B, N, heads * d), dtype, 31).reshape(B, N, heads, d).transpose(0, 2, 1, 3)
    out2 = relu_linear_attention(s, s, s)
    assert _rel_err(out2, la.relu_linear_attention_reference(_f32(s), _f32(s), _f32(s))) < TOL[dtype]


def test_linear_attention_all_negative_keys_give_zero(metal_dispatch):
    q = _rand((1, 2, 40, 32), mx.float32, 40)
    k = -mx.abs(_rand((1, 2, 50, 32), mx.float32, 41))
    v = _rand((1, 2, 50, 32), mx.float32, 42)
    out = relu_linear_attention(q, k, v)
    assert np.array_equal(np.asarray(out), np.zeros((1, 2, 40, 32), np.float32))


def test_linear_attention_shapes_beyond_the_kernel_fall_back_to_the_twin(metal_dispatch):
    q = _rand((1, 1, 20, 200), mx.float32, 45)  # d + d_v too large to stage 32 rows in threadgroup memory
    v = _rand((1, 1, 20, 20), mx.float32, 46)
    assert not metal.MetalKernels.linear_attention_supported(q, q, v)
    out = relu_linear_attention(q, q, v)
    assert _rel_err(out, la.relu_linear_attention_reference(q, q, v)) == 0.0
    assert _kernel_names(metal_dispatch) == []


@pytest.mark.skipif(ON_MAC, reason="schedules and the sanitizer are emulator checks (Linux)")
def test_linear_attention_kernels_race_free_and_in_bounds(metal_dispatch):
    B, N, heads, d = 1, 300, 2, 32
    qkv = _rand((B, N, heads * 3 * d), mx.float32, 50).reshape(B, N, heads, 3, d)
    q, k, v = (qkv[:, :, :, i, :].transpose(0, 2, 1, 3) for i in range(3))
    out = mslemu.check_schedules(lambda: relu_linear_attention(q, k, v))
    with mslemu.settings(sanitize=True):
        out_san = relu_linear_attention(q, k, v)
    ref = la.relu_linear_attention_reference(q, k, v)
    assert _rel_err(out, ref) < TOL[mx.float32] and _rel_err(out_san, ref) < TOL[mx.float32]


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------
@pytest.mark.skipif(ON_MAC, reason="patches the backend; on a Mac the real dispatch is exercised above")
def test_environment_switch_forces_the_twin_on_metal(metal_dispatch, monkeypatch):
    x = _rand((1, 6, 6, 8), mx.float32, 60)
    w = _rand((8, 3, 3, 1), mx.float32, 61)
    q = _rand((1, 2, 10, 32), mx.float32, 62)
    monkeypatch.setenv(_dispatch.ENV, "twin")
    depthwise_conv2d(x, w)
    relu_linear_attention(q, q, q)
    assert metal_dispatch == []  # no kernel launched
    monkeypatch.setenv(_dispatch.ENV, "bogus")
    with pytest.raises(ValueError, match="MOBILEO_MLX_KERNELS"):
        depthwise_conv2d(x, w)
    monkeypatch.setenv(_dispatch.ENV, "auto")
    depthwise_conv2d(x, w)
    assert len(metal_dispatch) == 1


def test_cpu_and_cuda_never_reach_the_metal_kernels(monkeypatch):
    for backend in ("cpu", "cuda"):
        monkeypatch.setattr(_dispatch.platform, "backend", lambda b=backend: b)
        assert not _dispatch.use_metal()


# ---------------------------------------------------------------------------
# CPU twins: shift-and-add against mx.conv2d / mx.conv1d
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
    twin = dw._twin2d(x, w, b, (stride, stride), (k // 2, k // 2), "plain" if b is None else "bias")
    ref = dw.depthwise_conv2d_reference(_f32(x), _f32(w), None if b is None else _f32(b), stride, k // 2)
    assert twin.dtype == dtype
    assert _rel_err(twin, ref) < TOL[dtype]


@pytest.mark.parametrize("shape,mult,k,stride,has_bias", [((1, 12, 10, 7), 2, 7, 2, True), ((2, 9, 9, 16), 1, 3, 1, False)])
def test_twin_split_over_two_cpu_streams_is_exact(monkeypatch, shape, mult, k, stride, has_bias):
    # Large convs run as two channel halves, one per CPU stream: the same products per
    # channel, so the result is bit-identical to the unsplit twin (odd channel counts and
    # channel multipliers included).
    monkeypatch.setattr(dw, "SPLIT_MIN_MACS", 1)
    C = shape[-1]
    x = _rand(shape, mx.float32, 73)
    w = _rand((C * mult, k, k, 1), mx.float32, 74, 0.3)
    b = _rand((C * mult,), mx.float32, 75) if has_bias else None
    args = (x, w, b, (stride, stride), (k // 2, k // 2), "plain" if b is None else "bias")
    split = dw._twin2d(*args)
    assert np.array_equal(np.array(split), np.array(dw._twin2d_whole(*args)))
    assert _rel_err(split, dw.depthwise_conv2d_reference(x, w, b, stride, k // 2)) < 2e-6


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_linear_attention_split_over_two_cpu_streams_is_exact(monkeypatch, batch):
    # On the CPU an even batch runs as two halves, one per stream: the same operations per
    # batch element, so bit-identical to the unsplit twin; an odd batch runs whole.
    monkeypatch.setattr(la, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_dispatch.platform, "backend", lambda: "cpu")
    pieces = []
    real = _dispatch.platform.cpu_pieces
    monkeypatch.setattr(_dispatch.platform, "cpu_pieces", lambda n, build: pieces.append(n) or real(n, build))
    q, k, v = (_rand((batch, 3, n, 8), mx.float32, seed) for n, seed in ((10, 30), (7, 31), (7, 32)))
    out = relu_linear_attention(q, k, v)
    assert np.array_equal(np.array(out), np.array(la.relu_linear_attention_reference(q, k, v)))
    assert pieces == ([] if batch % 2 else [2])


@pytest.mark.parametrize("epilogue", ["plain", "bias", "glu"])
def test_gpu_twin_matches_the_reference(epilogue):
    """The twin CUDA (and Metal with MOBILEO_MLX_KERNELS=twin) runs: mx.conv2d + compiled epilogue."""
    x = _rand((2, 7, 9, 16), mx.float32, 90)
    w = _rand((16, 3, 3, 1), mx.float32, 91)
    b = None if epilogue == "plain" else _rand((16,), mx.float32, 92)
    got = dw._gpu_twin(x, w, b, (1, 1), (1, 1), epilogue)
    ref = dw.depthwise_conv2d_reference(x, w, b)
    ref = dw.glu(ref) if epilogue == "glu" else ref
    assert _rel_err(got, ref) < 2e-6
    xs, ws = _rand((2, 30, 16), mx.float32, 93), _rand((16, 3, 1), mx.float32, 94)
    got1 = dw._gpu_twin(xs, ws, None, 1, 1, "plain")
    assert _rel_err(got1, dw.depthwise_conv1d_reference(xs, ws)) < 2e-6


def test_cpu_public_functions_use_the_twin_and_agree_with_the_reference(monkeypatch):
    monkeypatch.setattr(_dispatch.platform, "backend", lambda: "cpu")
    x = _rand((2, 12, 10, 32), mx.float32, 80)
    w = _rand((32, 3, 3, 1), mx.float32, 81)
    b = _rand((32,), mx.float32, 82)
    assert _rel_err(glu_depthwise_conv2d(x, w, b), dw.glu_depthwise_conv2d_reference(x, w, b)) < 2e-6
    xs = _rand((2, 41, 24), mx.float32, 83)
    ws = _rand((24, 3, 1), mx.float32, 84)
    assert _rel_err(depthwise_conv1d(xs, ws), dw.depthwise_conv1d_reference(xs, ws)) < 2e-6
    assert _rel_err(depthwise_conv1d(xs, ws, padding=0), dw.depthwise_conv1d_reference(xs, ws, padding=0)) < 2e-6
    wd = _rand((64, 7, 7, 1), mx.float32, 85)
    assert _rel_err(depthwise_conv2d(x, wd, None, stride=2, padding=3),
                    dw.depthwise_conv2d_reference(x, wd, None, 2, 3)) < 2e-6
    monkeypatch.setenv(_dispatch.ENV, "reference")
    assert _rel_err(depthwise_conv2d(x, w, b), dw.depthwise_conv2d_reference(x, w, b)) == 0.0
