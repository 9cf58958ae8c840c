"""The Metal emulator (tests/mslemu) itself: MLX-exact source generation, MSL semantics
(attributes, partial threadgroups, SIMD-group functions, types), and that it catches the
bugs it claims to catch (races, unwritten outputs, uninitialised threadgroup memory,
out-of-bounds reads).

The signature check runs everywhere (it needs only MLX). The rest compiles kernels with
g++ on the CPU; on macOS it is skipped with that reason, because there
tests/test_kernels.py runs the real kernels on the GPU instead.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import pytest

import mlx.core as mx

from tests import mslemu
from tests.mslemu import MslemuError

needs_emulator = pytest.mark.skipif(
    sys.platform == "darwin", reason="the CPU emulator is Linux CI tooling; macOS runs the real kernels on the GPU")


# ---------------------------------------------------------------------------
# Source generation: byte for byte what MLX generates
# ---------------------------------------------------------------------------
_SIG_CASES = [
    # name, input names, output names, source, header, atomic, inputs [(shape, dtype)], out dtypes, template
    ("plain", ["a"], ["o"], "o[0] = a[0];", "", False, [((10,), mx.float32)], [mx.float32], []),
    ("noattr_shapes", ["a", "b"], ["o", "p"], "o[0] = a[a_ndim - 1] + a_shape[0] + a_strides[0] + b[0];", "", False,
     [((4, 5), mx.float16), ((3,), mx.float32)], [mx.float16, mx.int32], []),
    ("scalar_small", ["x", "eps", "small"], ["out"],
     "uint i = thread_position_in_grid.x; out[i] = x[i] + eps + small[0] + thread_index_in_simdgroup;", "", False,
     [((64,), mx.bfloat16), ((), mx.float32), ((7,), mx.int32)], [mx.bfloat16], [("T", mx.bfloat16)]),
    ("templates", ["x"], ["out"],
     "out[threadgroup_position_in_grid.y] = T(N) + B + x_strides[1] + threads_per_threadgroup.z + simdgroups_per_threadgroup;",
     "#include <metal_stdlib>\nusing namespace metal;\n", False,
     [((2, 8), mx.float32)], [mx.float32], [("T", mx.float32), ("N", 3), ("B", True), ("U", mx.bfloat16), ("F", False)]),
    ("atomic", ["x"], ["hist", "count"],
     "atomic_fetch_add_explicit(&hist[x[thread_position_in_grid.x]], 1, memory_order_relaxed);", "", True,
     [((32,), mx.uint32)], [mx.int32, mx.int32], []),
    ("all_attrs", ["x"], ["out"],
     "out[0] = dispatch_quadgroups_per_threadgroup + dispatch_simdgroups_per_threadgroup + "
     "dispatch_threads_per_threadgroup.x + grid_origin.x + grid_size.x + quadgroup_index_in_threadgroup + "
     "quadgroups_per_threadgroup + simdgroup_index_in_threadgroup + simdgroups_per_threadgroup + "
     "thread_execution_width + thread_index_in_quadgroup + thread_index_in_simdgroup + thread_index_in_threadgroup + "
     "thread_position_in_grid.x + thread_position_in_threadgroup.x + threadgroup_position_in_grid.x + "
     "threadgroups_per_grid.x + threads_per_grid.x + threads_per_simdgroup + threads_per_threadgroup.x + x[0];",
     "", False, [((9,), mx.int64)], [mx.uint8], [("K", 7)]),
]


def _mlx_printed_sources(capfd, calls) -> list[str]:
    """Trace each (kernel, call kwargs, inputs) with mx.export_function and return the source MLX prints."""
    capfd.readouterr()
    for kern, kwargs, inputs in calls:
        def f(*arrays):
            return kern(inputs=list(arrays), verbose=True, **kwargs)

        with tempfile.TemporaryDirectory() as d:
            mx.export_function(f"{d}/k.mlxfn", f, *inputs)
    out = capfd.readouterr().out
    blocks = out.split("Generated source code for `")[1:]
    return [b.split("```\n", 1)[1].rsplit("\n```", 1)[0] for b in blocks]


def test_generated_source_matches_mlx_byte_for_byte(capfd):
    calls, mine = [], []
    for name, ins, outs, src, hdr, atomic, in_specs, out_dtypes, template in _SIG_CASES:
        inputs = [mx.zeros(shape, dtype=dt) for shape, dt in in_specs]
        kern = mx.fast.metal_kernel(name=name, input_names=ins, output_names=outs, source=src, header=hdr,
                                    atomic_outputs=atomic)
        kwargs = dict(template=template or None, grid=(32, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(4,)] * len(outs), output_dtypes=out_dtypes)
        calls.append((kern, kwargs, inputs))
        metas = [mslemu.InputMeta(a.dtype, a.ndim, a.size) for a in inputs]
        mine.append(mslemu.generate_source(name, ins, outs, src, hdr, metas, out_dtypes, template, atomic).source)
    printed = _mlx_printed_sources(capfd, calls)
    assert len(printed) == len(mine)
    for got, want, case in zip(mine, printed, _SIG_CASES):
        assert got == want, f"case {case[0]}:\n--- emulator\n{got}\n--- MLX\n{want}"


def test_project_kernel_sources_match_mlx_byte_for_byte(capfd):
    """The project's real kernels, with the very call arguments kernels.metal passes."""
    from mobileo_mlx.kernels.metal import MetalKernels

    recorded = []

    class Recording:
        def __init__(self, **ctor):
            self.ctor = ctor
            self.real = mx.fast.metal_kernel(**ctor)

        def __call__(self, **call):
            metas = [mslemu.InputMeta(a.dtype, a.ndim, a.size) for a in call["inputs"]]
            c = self.ctor
            recorded.append(mslemu.generate_source(
                c["name"], c["input_names"], c["output_names"], c["source"], c.get("header", ""), metas,
                call["output_dtypes"], call.get("template") or [], c.get("atomic_outputs", False)).source)
            return self.real(verbose=True, **call)

    mk = MetalKernels(lambda **ctor: Recording(**ctor))

    def f(x, w, b, xg, wg, bg, x5, w5, q, k, v):
        return [mk.depthwise(x, w, b, (2, 2), (3, 3)), mk.depthwise(xg, wg, bg, (1, 1), (1, 1), glu=True),
                mk.depthwise(x5, w5, None, (1, 1), (2, 2)), mk.linear_attention(q, k, v)]

    capfd.readouterr()
    args = [mx.zeros((1, 9, 9, 8), mx.float16), mx.zeros((16, 7, 7, 1), mx.float16), mx.zeros((16,), mx.float16),
            mx.zeros((1, 4, 4, 12), mx.bfloat16), mx.zeros((12, 3, 3, 1), mx.bfloat16), mx.zeros((12,), mx.bfloat16),
            mx.zeros((2, 6, 6, 24)), mx.zeros((24, 5, 5, 1)),
            mx.zeros((1, 2, 300, 32)), mx.zeros((1, 2, 300, 32)), mx.zeros((1, 2, 300, 32))]
    with tempfile.TemporaryDirectory() as d:
        mx.export_function(f"{d}/k.mlxfn", f, *args)
    out = capfd.readouterr().out
    printed = [b.split("```\n", 1)[1].rsplit("\n```", 1)[0] for b in out.split("Generated source code for `")[1:]]
    assert len(printed) == len(recorded) == 5
    assert printed == recorded


# ---------------------------------------------------------------------------
# MSL semantics
# ---------------------------------------------------------------------------
_ATTR_SRC = "\n".join(
    ["uint3 p = thread_position_in_grid;",
     "uint gid = (p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x;",
     "device uint* o = out + gid * %d;" % (3 * len(mslemu.ATTRIBUTES))]
    + [(f"o[{3 * i}] = {a}.x; o[{3 * i + 1}] = {a}.y; o[{3 * i + 2}] = {a}.z;" if t == "uint3"
        else f"o[{3 * i}] = {a}; o[{3 * i + 1}] = 0; o[{3 * i + 2}] = 0;")
       for i, (a, t) in enumerate(mslemu.ATTRIBUTES)])


def _attr_model(grid, tg_req):
    tg = [min(t, g) for t, g in zip(tg_req, grid)]
    ntg = [-(-g // t) for g, t in zip(grid, tg)]
    rows = {}
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                p = (x, y, z)
                tgp = [p[d] // tg[d] for d in range(3)]
                tp = [p[d] % tg[d] for d in range(3)]
                act = [min(tg[d], grid[d] - tgp[d] * tg[d]) for d in range(3)]
                n = act[0] * act[1] * act[2]
                tid = tp[0] + tp[1] * act[0] + tp[2] * act[0] * act[1]
                # MLX's clamped threadgroup is what Metal sees as the dispatch size
                v = {
                    "dispatch_quadgroups_per_threadgroup": -(-(tg[0] * tg[1] * tg[2]) // 4),
                    "dispatch_simdgroups_per_threadgroup": -(-(tg[0] * tg[1] * tg[2]) // 32),
                    "dispatch_threads_per_threadgroup": tg, "grid_origin": (0, 0, 0), "grid_size": grid,
                    "quadgroup_index_in_threadgroup": tid // 4, "quadgroups_per_threadgroup": -(-n // 4),
                    "simdgroup_index_in_threadgroup": tid // 32, "simdgroups_per_threadgroup": -(-n // 32),
                    "thread_execution_width": 32, "thread_index_in_quadgroup": tid % 4,
                    "thread_index_in_simdgroup": tid % 32, "thread_index_in_threadgroup": tid,
                    "thread_position_in_grid": p, "thread_position_in_threadgroup": tp,
                    "threadgroup_position_in_grid": tgp, "threadgroups_per_grid": ntg, "threads_per_grid": grid,
                    "threads_per_simdgroup": 32, "threads_per_threadgroup": act,
                }
                row = []
                for a, t in mslemu.ATTRIBUTES:
                    val = v[a]
                    row += list(val) if t == "uint3" else [val, 0, 0]
                rows[(z * grid[1] + y) * grid[0] + x] = row
    return np.array([rows[i] for i in range(len(rows))], dtype=np.uint32)


@needs_emulator
@pytest.mark.parametrize("grid,tg", [((37, 5, 3), (16, 2, 2)), ((7, 9, 2), (4, 4, 4)), ((70, 1, 1), (64, 1, 1))])
def test_attributes_match_the_metal_model(grid, tg):
    k = mslemu.metal_kernel("attrs", ["dummy"], ["out"], _ATTR_SRC)
    (out,) = k(inputs=[mx.zeros((1,))], grid=grid, threadgroup=tg,
               output_shapes=[(grid[0] * grid[1] * grid[2], 3 * len(mslemu.ATTRIBUTES))], output_dtypes=[mx.uint32])
    np.testing.assert_array_equal(np.asarray(out), _attr_model(grid, tg))


_SIMD_SRC = """
    const uint t = thread_position_in_grid.x;
    const uint lane = thread_index_in_simdgroup;
    const float v = x[t];
    out[t * 8 + 0] = simd_sum(v);
    out[t * 8 + 1] = simd_max(v);
    out[t * 8 + 2] = simd_prefix_exclusive_sum(v);
    out[t * 8 + 3] = simd_shuffle_xor(v, ushort(1));
    out[t * 8 + 4] = simd_shuffle_down(v, ushort(3));
    out[t * 8 + 5] = simd_broadcast_first(v);
    float d;
    if (lane % 3 == 0) {
        d = simd_sum(v);        // divergent: only lanes with lane % 3 == 0
    } else {
        d = -simd_min(v);
    }
    out[t * 8 + 6] = d;
    out[t * 8 + 7] = float(popcount(uint(uint64_t(simd_ballot(v > 0.0f)))));
"""


@needs_emulator
def test_simd_group_functions_with_partial_and_divergent_groups():
    n = 40  # one full SIMD-group and one of 8 lanes (threadgroup 40)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    k = mslemu.metal_kernel("simd", ["x"], ["out"], _SIMD_SRC)
    with mslemu.settings(strict=False):  # lanes 37..39 shuffle down from lanes that do not exist
        (out,) = k(inputs=[mx.array(x)], grid=(n, 1, 1), threadgroup=(n, 1, 1), output_shapes=[(n, 8)],
                   output_dtypes=[mx.float32])
    out = np.asarray(out)
    want = np.zeros((n, 8), np.float32)
    for t in range(n):
        lo, hi = (t // 32) * 32, min(n, (t // 32) * 32 + 32)
        g = x[lo:hi]
        lane = t - lo
        want[t, 0] = g.sum(dtype=np.float32)
        want[t, 1] = g.max()
        want[t, 2] = g[:lane].sum(dtype=np.float32)
        want[t, 3] = g[lane ^ 1]
        want[t, 4] = x[t] if lane + 3 >= 32 else (g[lane + 3] if lane + 3 < len(g) else np.nan)
        want[t, 5] = g[0]
        sel = np.arange(len(g)) % 3 == 0
        want[t, 6] = g[sel].sum(dtype=np.float32) if lane % 3 == 0 else -g[~sel].min()
        want[t, 7] = (g > 0).sum()
    # lanes 5..7 of the partial group shuffle down from lanes that do not exist: undefined (warned)
    undefined = np.zeros((n, 8), bool)
    undefined[32 + 5:, 4] = True
    np.testing.assert_allclose(out[~undefined], want[~undefined], rtol=1e-6, atol=1e-6)
    assert [w for w in k.last["warnings"] if "simd_shuffle_down reads a lane that is missing" in w]
    with pytest.raises(MslemuError, match="simd_shuffle_down reads a lane that is missing"):  # strict (default)
        k(inputs=[mx.array(x)], grid=(n, 1, 1), threadgroup=(n, 1, 1), output_shapes=[(n, 8)],
          output_dtypes=[mx.float32])


_TYPES_SRC = """
    uint t = thread_position_in_grid.x;
    float4 a = float4(x[4 * t], x[4 * t + 1], x[4 * t + 2], x[4 * t + 3]);
    half4 h = half4(a);
    bfloat4 bf = bfloat4(a);
    float2 xy = a.xy;
    float3 rest = float3(xy, a.z) * 2.0f + float3(1.0f);
    out[8 * t + 0] = dot(a, float4(1.0f));
    out[8 * t + 1] = float(h.x * h.y);           // half arithmetic
    out[8 * t + 2] = float(bf.z);                 // bfloat rounding
    out[8 * t + 3] = rest.x + rest.y + rest.z;
    out[8 * t + 4] = metal::max(a.w, 0.0f) + metal::clamp(a.x, -0.5f, 0.5f);
    out[8 * t + 5] = as_type<float>(as_type<uint>(a.y) ^ 0x80000000u);  // -a.y
    out[8 * t + 6] = metal::precise::exp(a.z) + metal::fast::tanh(a.w) + select(1.0f, 2.0f, a.x > 0.0f);
    out[8 * t + 7] = float(numeric_limits<half>::max()) + float(sizeof(float3)) + Limits<bfloat16_t>::finite_max * 0.0f;
"""


@needs_emulator
def test_vector_half_bfloat_and_math():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4 * 16).astype(np.float32)
    k = mslemu.metal_kernel("types", ["x"], ["out"], _TYPES_SRC)
    (out,) = k(inputs=[mx.array(x)], grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(16, 8)],
               output_dtypes=[mx.float32])
    out = np.asarray(out)
    a = x.reshape(16, 4)
    bf = np.asarray(mx.array(a[:, 2]).astype(mx.bfloat16).astype(mx.float32))
    want = np.stack([
        a.sum(1),
        (a[:, 0].astype(np.float16) * a[:, 1].astype(np.float16)).astype(np.float32),
        bf,
        (a[:, 0] * 2 + 1) + (a[:, 1] * 2 + 1) + (a[:, 2] * 2 + 1),
        np.maximum(a[:, 3], 0) + np.clip(a[:, 0], -0.5, 0.5),
        -a[:, 1],
        np.exp(a[:, 2]) + np.tanh(a[:, 3]) + np.where(a[:, 0] > 0, 2.0, 1.0),
        np.full(16, 65504.0 + 16.0),
    ], axis=1)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6)


@needs_emulator
def test_strided_inputs_follow_mlx_strides():
    src = """
        uint e = thread_position_in_grid.x;
        out[e] = x[elem_to_loc(e, x_shape, x_strides, x_ndim)];
    """
    k = mslemu.metal_kernel("strided", ["x"], ["out"], src, ensure_row_contiguous=False)
    base = mx.arange(2 * 3 * 5, dtype=mx.float32).reshape(2, 3, 5)
    view = base.transpose(2, 0, 1)[1:, :, ::2]
    (out,) = k(inputs=[view], grid=(view.size, 1, 1), threadgroup=(32, 1, 1), output_shapes=[view.shape],
               output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(view))
    # with ensure_row_contiguous=True the kernel sees a row-contiguous copy
    k2 = mslemu.metal_kernel("strided2", ["x"], ["out"], src)
    (out2,) = k2(inputs=[view], grid=(view.size, 1, 1), threadgroup=(32, 1, 1), output_shapes=[view.shape],
                 output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(view))


@needs_emulator
def test_atomic_outputs_and_init_value_across_worker_threads():
    src = "atomic_fetch_add_explicit(&hist[x[thread_position_in_grid.x]], 1, memory_order_relaxed);"
    k = mslemu.metal_kernel("hist", ["x"], ["hist"], src, atomic_outputs=True)
    x = np.random.default_rng(2).integers(0, 10, size=5000).astype(np.uint32)
    (h,) = k(inputs=[mx.array(x)], grid=(5000, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(10,)],
             output_dtypes=[mx.int32], init_value=0, workers=2)
    np.testing.assert_array_equal(np.asarray(h), np.bincount(x, minlength=10))


# ---------------------------------------------------------------------------
# The bugs the emulator claims to catch
# ---------------------------------------------------------------------------
_SOFTMAX_RACY = """
    threadgroup float smem[32];
    const uint tid = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint nsg = simdgroups_per_threadgroup;
    const float v = x[thread_position_in_grid.x];
    float m = simd_max(v);
    if (lane == 0) { smem[sg] = m; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float t = lane < nsg ? smem[lane] : -INFINITY;
        t = simd_max(t);
        if (lane == 0) { smem[0] = t; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    m = smem[0];
    const float e = metal::exp(v - m);
    const float s = simd_sum(e);
    @FIX@
    if (lane == 0) { smem[sg] = s; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (uint i = 0; i < nsg; ++i) { total += smem[i]; }
    out[thread_position_in_grid.x] = e / total;
"""


def _softmax(fix: bool):
    k = mslemu.metal_kernel("softmax_" + ("fixed" if fix else "racy"), ["x"], ["out"],
                            _SOFTMAX_RACY.replace("@FIX@", "threadgroup_barrier(mem_flags::mem_threadgroup);"
                                                  if fix else ""))
    x = mx.array(np.random.default_rng(3).standard_normal(256).astype(np.float32) * 3)
    return k, (lambda: k(inputs=[x], grid=(256, 1, 1), threadgroup=(128, 1, 1), output_shapes=[(256,)],
                         output_dtypes=[mx.float32])[0]), x


@needs_emulator
def test_race_reusing_threadgroup_memory_is_caught_only_by_the_eager_schedule():
    _, run, x = _softmax(fix=False)
    with mslemu.settings(schedule="forward"):
        fwd = run()
    for sched in ("reverse", "random"):
        with mslemu.settings(schedule=sched, seed=5):
            np.testing.assert_array_equal(np.asarray(run()), np.asarray(fwd))
    with pytest.raises(MslemuError, match="differ between schedules"):
        mslemu.check_schedules(run)
    # the fixed kernel agrees under every schedule and with the reference
    _, run_fixed, _ = _softmax(fix=True)
    out = mslemu.check_schedules(run_fixed)
    ref = np.concatenate([np.exp(c - c.max()) / np.exp(c - c.max()).sum() for c in np.asarray(x).reshape(2, 128)])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)


@needs_emulator
def test_missing_barrier_is_caught():
    src = """
        threadgroup float smem[64];
        const uint t = thread_index_in_threadgroup;
        smem[t] = x[thread_position_in_grid.x];
        // missing threadgroup_barrier
        out[thread_position_in_grid.x] = smem[(t + 1) % threads_per_threadgroup.x];
    """
    k = mslemu.metal_kernel("nobarrier", ["x"], ["out"], src)

    def run():
        return k(inputs=[mx.arange(128, dtype=mx.float32)], grid=(128, 1, 1), threadgroup=(64, 1, 1),
                 output_shapes=[(128,)], output_dtypes=[mx.float32])[0]

    with pytest.raises(MslemuError, match="poison pattern"):  # forward: reads a neighbour not yet written
        run()
    with mslemu.settings(strict=False), pytest.raises(MslemuError, match="differ between schedules"):
        mslemu.check_schedules(run)


@needs_emulator
def test_unwritten_output_is_flagged():
    k = mslemu.metal_kernel("half_written", ["x"], ["out"],
                            "uint t = thread_position_in_grid.x; if (t % 2 == 0) { out[t] = x[t]; }")
    with pytest.raises(MslemuError, match=r"50 element\(s\) of output `out` hold the poison pattern"):
        k(inputs=[mx.ones((100,))], grid=(100, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(100,)],
          output_dtypes=[mx.float32])
    with mslemu.settings(strict=False):
        (out,) = k(inputs=[mx.ones((100,))], grid=(100, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(100,)],
                   output_dtypes=[mx.float16])
    assert np.isnan(np.asarray(out)[1::2]).all() and k.last["unwritten"] == {"out": 50}


@needs_emulator
def test_uninitialised_threadgroup_memory_is_flagged():
    src = """
        threadgroup float smem[32];
        const uint t = thread_index_in_threadgroup;
        if (t < 31) { smem[t] = x[thread_position_in_grid.x]; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = smem[t] * 2.0f;
    """
    k = mslemu.metal_kernel("uninit_tg", ["x"], ["out"], src)
    with pytest.raises(MslemuError, match=r"2 element\(s\) of output `out` hold the poison pattern"):
        k(inputs=[mx.ones((64,))], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)],
          output_dtypes=[mx.float32])


@needs_emulator
def test_out_of_bounds_reads_are_caught_by_the_sanitizer_build():
    k = mslemu.metal_kernel("oob", ["x"], ["out"],
                            "uint t = thread_position_in_grid.x;\nout[t] = x[t] + x[t + 1];")
    args = dict(inputs=[mx.ones((50,))], grid=(50, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(50,)],
                output_dtypes=[mx.float32])
    with pytest.raises(MslemuError, match=r"heap-buffer-overflow(.|\n)*source:2"):
        k(sanitize=True, **args)
    # threadgroup memory is heap-backed with its exact size, so its overflows are caught too
    k2 = mslemu.metal_kernel("oob_tg", ["x"], ["out"], """
        threadgroup float smem[32];
        uint t = thread_index_in_threadgroup;
        smem[t] = x[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = smem[t + 1];
    """)
    with pytest.raises(MslemuError, match=r"(heap-buffer-overflow|index 32 out of bounds)(.|\n)*source:6"):
        k2(inputs=[mx.ones((32,))], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
           output_dtypes=[mx.float32], sanitize=True)


@needs_emulator
def test_barrier_misuse_limits_and_lint_are_reported():
    early = mslemu.metal_kernel("early_return", ["x"], ["out"], """
        uint t = thread_index_in_threadgroup;
        if (t >= 50) { return; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = x[t];
    """)
    with mslemu.settings(strict=False):
        early(inputs=[mx.ones((64,))], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)],
              output_dtypes=[mx.float32])
    assert any("reached by 50 of 64 threads" in w and "source:4" in w for w in early.last["warnings"])

    big = mslemu.metal_kernel("big_tg", ["x"], ["out"], """
        threadgroup float a[8192];
        threadgroup float b2[8];
        a[thread_index_in_threadgroup] = x[0]; b2[0] = 1.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_index_in_threadgroup] = a[0] + b2[0];
    """)
    with pytest.raises(MslemuError, match="exceeds the 32 KiB limit"):
        big(inputs=[mx.ones((1,))], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(4,)],
            output_dtypes=[mx.float32])
    with pytest.raises(MslemuError, match=r"Thread group size \(2048\)"):
        big(inputs=[mx.ones((1,))], grid=(4096, 1, 1), threadgroup=(1024, 2, 1), output_shapes=[(4,)],
            output_dtypes=[mx.float32])
    lint = mslemu.metal_kernel("lint", ["x"], ["out"], "out[simd_lane_id] = x[0];")
    assert any("simd_lane_id" in m for m in lint.lint)


@needs_emulator
def test_compile_errors_point_at_the_body_line():
    k = mslemu.metal_kernel("broken", ["x"], ["out"], "uint t = thread_position_in_grid.x;\nout[t] = undefined_name;")
    with pytest.raises(MslemuError, match=r"source:2"):
        k(inputs=[mx.ones((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(4,)],
          output_dtypes=[mx.float32])


def test_missing_compiler_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("CXX", "definitely-not-a-compiler-xyz")
    k = mslemu.metal_kernel("nocxx_" + str(id(monkeypatch)), ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(MslemuError, match="needs a C\\+\\+20 compiler"):
        k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
