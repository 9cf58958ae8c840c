"""Metal kernel bodies for ``mx.fast.metal_kernel`` and the calls that launch them.

Everything that reaches Metal is defined here once: the body text, the kernel
names/inputs/outputs, and the exact call arguments (template, grid,
threadgroup, output shapes). ``MetalKernels(factory)`` builds the kernels with
``mx.fast.metal_kernel`` (on a Mac) or with the test emulator's drop-in
``tests/mslemu.metal_kernel`` (on Linux CI), so both run the very same body and call.

Conventions (MLX 0.32): ``x_shape`` is ``const constant int*``, ``x_strides`` is
``const constant int64_t*``, a 0-d input is ``const constant T&``; attributes are
declared only when their name occurs in the body; SIMD-groups are 32 wide.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

# ---------------------------------------------------------------------------
# Depthwise / channel-multiplier grouped convolution, NHWC, fused epilogue
# ---------------------------------------------------------------------------
# One thread computes TW consecutive output columns of one output channel in
# one output row: the input row segment it needs is loaded once into registers
# and reused by every tap (7x7 stride 1, TW=4: 70 loads instead of 196).
# Accumulation is fp32 whatever the input type. Output channel `co` reads input
# channel `co / M` (M = channel multiplier, 1 for depthwise).
#
# GLU variant (SANA / DC-AE GLUMBConv): the conv has 2*COUT channels; the thread
# computes channel c (a) and c + COUT (g) and writes (a + b[c]) * SiLU(g + b[c+COUT]).
_DW_BODY = """
    const int H = x_shape[1];
    const int W = x_shape[2];
    const int C = x_shape[3];
    const int HO = (H + 2 * PH - KH) / SH + 1;
    const int WO = (W + 2 * PW - KW) / SW + 1;
    const int COUT = GLU ? (C * M) / 2 : C * M;
    const int c = int(thread_position_in_grid.x);
    const int wo0 = int(thread_position_in_grid.y) * TW;
    const int row = int(thread_position_in_grid.z);  // b * HO + ho
    const int b = row / HO;
    const int ho = row - b * HO;
    constexpr int NX = (TW - 1) * SW + KW;   // input columns one thread reads per kernel row
    constexpr int NG = GLU ? 2 : 1;
    float acc[NG][TW];
    for (int g = 0; g < NG; ++g) {
        for (int t = 0; t < TW; ++t) {
            acc[g][t] = 0.0f;
        }
    }
    const int wi0 = wo0 * SW - PW;
    for (int i = 0; i < KH; ++i) {
        const int hi = ho * SH - PH + i;
        if (hi < 0 || hi >= H) {
            continue;
        }
        const size_t xrow = (size_t(b) * H + hi) * size_t(W) * C;
        for (int g = 0; g < NG; ++g) {
            const int co = c + g * COUT;
            const int ci = co / M;
            float xr[NX];
            for (int j = 0; j < NX; ++j) {
                const int wi = wi0 + j;
                xr[j] = (wi >= 0 && wi < W) ? float(x[xrow + size_t(wi) * C + ci]) : 0.0f;
            }
            const size_t wrow = (size_t(co) * KH + i) * KW;
            for (int j = 0; j < KW; ++j) {
                const float wv = float(w[wrow + j]);
                for (int t = 0; t < TW; ++t) {
                    acc[g][t] += wv * xr[t * SW + j];
                }
            }
        }
    }
    const size_t obase = size_t(row) * WO * COUT + c;
    for (int t = 0; t < TW; ++t) {
        const int wo = wo0 + t;
        if (wo >= WO) {
            break;
        }
        float v = acc[0][t];
@EPILOGUE@
        out[obase + size_t(wo) * COUT] = static_cast<T>(v);
    }
"""
_EPILOGUES = {
    "plain": "",
    "bias": "        v += float(bvec[c]);",
    "glu": ("        v += float(bvec[c]);\n"
            "        const float gate = acc[NG - 1][t] + float(bvec[c + COUT]);\n"
            "        v *= gate / (1.0f + metal::exp(-gate));"),
}

# ---------------------------------------------------------------------------
# ReLU linear attention (SANA self-attention, DC-AE LiteMLA)
# ---------------------------------------------------------------------------
# Pass 1 (kv): threadgroup (chunk s, batch*head bh) reduces rows [s*CH, s*CH+CH) of
#   kv[i, j] = sum_n relu(k[n, i]) v[n, j]   and   ksum[i] = sum_n relu(k[n, i])
#   in fp32, staging ROWS rows of relu(k) and v in threadgroup memory; it writes
#   a partial [D*DV + D] block. (Partials of several chunks are summed by MLX.)
# Pass 2 (out): each threadgroup loads kv/ksum of its (batch, head) into
#   threadgroup memory; each SIMD-group takes one query row at a time (its q[i]
#   are uniform loads), lane l computes the output columns l, l+32, ...:
#   out[n, j] = sum_i relu(q[n, i]) kv[i, j] / (sum_i relu(q[n, i]) ksum[i] + eps).
#   (A simd_shuffle version moves no less data on the GPU and costs a fiber switch
#   per shuffle in the emulator.)
# q, k, v are read through their strides (ensure_row_contiguous=False), so the
# transposed [B, heads, N, d] views SANA and LiteMLA build are not copied.
_LA_KV_BODY = """
    constexpr int DD = D * DV;
    constexpr int E = (DD + TG - 1) / TG;
    threadgroup float ks[ROWS * D];
    threadgroup float vs[ROWS * DV];
    const int tid = int(thread_index_in_threadgroup);
    const int s = int(threadgroup_position_in_grid.y);
    const int S = int(threadgroups_per_grid.y);
    const int bh = int(threadgroup_position_in_grid.z);
    const int H = k_shape[1];
    const int N = k_shape[2];
    const int b = bh / H;
    const int h = bh - b * H;
    const int64_t kb = b * k_strides[0] + h * k_strides[1];
    const int64_t vb = b * v_strides[0] + h * v_strides[1];
    const int n_begin = s * CH;
    const int n_end = min(N, n_begin + CH);
    float acc[E];
    for (int q = 0; q < E; ++q) {
        acc[q] = 0.0f;
    }
    float ksum = 0.0f;
    for (int n0 = n_begin; n0 < n_end; n0 += ROWS) {
        const int rows = min(ROWS, n_end - n0);
        for (int e = tid; e < ROWS * D; e += TG) {
            const int r = e / D;
            const int i = e - r * D;
            ks[e] = r < rows
                ? max(float(k[kb + int64_t(n0 + r) * k_strides[2] + int64_t(i) * k_strides[3]]), 0.0f)
                : 0.0f;
        }
        for (int e = tid; e < ROWS * DV; e += TG) {
            const int r = e / DV;
            const int j = e - r * DV;
            vs[e] = r < rows ? float(v[vb + int64_t(n0 + r) * v_strides[2] + int64_t(j) * v_strides[3]]) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int r = 0; r < rows; ++r) {
            for (int q = 0; q < E; ++q) {
                const int e = tid + q * TG;
                if (e < DD) {
                    acc[q] += ks[r * D + e / DV] * vs[r * DV + e % DV];
                }
            }
            if (tid < D) {
                ksum += ks[r * D + tid];
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    const int64_t dst = (int64_t(bh) * S + s) * (DD + D);
    for (int q = 0; q < E; ++q) {
        const int e = tid + q * TG;
        if (e < DD) {
            part[dst + e] = acc[q];
        }
    }
    if (tid < D) {
        part[dst + DD + tid] = ksum;
    }
"""

_LA_OUT_BODY = """
    constexpr int DD = D * DV;
    constexpr int OV = (DV + 31) / 32;
    threadgroup float kvs[DD + D];
    const int tid = int(thread_index_in_threadgroup);
    const int ntg = int(threads_per_threadgroup.x);
    const int bh = int(threadgroup_position_in_grid.z);
    const int64_t src = int64_t(bh) * (DD + D);
    for (int e = tid; e < DD + D; e += ntg) {
        kvs[e] = kv[src + e];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int lane = int(thread_index_in_simdgroup);
    const int sg = int(simdgroup_index_in_threadgroup);
    const int nsg = int(simdgroups_per_threadgroup);
    const int H = q_shape[1];
    const int N = q_shape[2];
    const int b = bh / H;
    const int h = bh - b * H;
    const int64_t qb = b * q_strides[0] + h * q_strides[1];
    const int r0 = int(threadgroup_position_in_grid.y) * RB;
    const int r1 = min(N, r0 + RB);
    for (int r = r0 + sg; r < r1; r += nsg) {
        const int64_t qrow = qb + int64_t(r) * q_strides[2];
        float num[OV];
        for (int t = 0; t < OV; ++t) {
            num[t] = 0.0f;
        }
        float den = 0.0f;
        for (int i = 0; i < D; ++i) {
            // the same address in every lane of the SIMD-group: one broadcast load
            const float qi = max(float(q[qrow + int64_t(i) * q_strides[3]]), 0.0f);
            den += qi * kvs[DD + i];
            for (int t = 0; t < OV; ++t) {
                const int j = lane + 32 * t;
                if (j < DV) {
                    num[t] += qi * kvs[i * DV + j];
                }
            }
        }
        for (int t = 0; t < OV; ++t) {
            const int j = lane + 32 * t;
            if (j < DV) {
                out[(int64_t(bh) * N + r) * DV + j] = static_cast<T>(num[t] / (den + eps));
            }
        }
    }
"""

# Launch parameters
DW_THREADGROUP = (32, 8, 1)
LA_TG = 256          # pass 1 threads per threadgroup
LA_ROWS = 32         # rows of k/v staged per step
LA_CHUNK = 256       # rows per pass-1 threadgroup
LA_SIMDGROUPS = 8    # pass 2: SIMD-groups per threadgroup
LA_ROWS_OUT = 64     # pass 2: query rows per threadgroup
LA_MAX_DD = 64 * 64  # kv must fit threadgroup memory (pass 2) with room to spare
TG_MEMORY = 32768    # bytes of threadgroup memory Metal guarantees
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def conv_out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


class MetalKernels:
    """The project's Metal kernels, built with ``factory`` (``mx.fast.metal_kernel`` or the emulator's)."""

    def __init__(self, factory: Callable[..., Any] | None = None):
        factory = factory or mx.fast.metal_kernel
        self.factory = factory
        self.dw = {
            kind: factory(
                name=f"mobileo_dwconv_{kind}",
                # (not "bias": with `using namespace metal` that is also a sampling-option type)
                input_names=["x", "w"] + ([] if kind == "plain" else ["bvec"]),
                output_names=["out"],
                source=_DW_BODY.replace("@EPILOGUE@", _EPILOGUES[kind]),
            )
            for kind in _EPILOGUES
        }
        self.la_kv = factory(
            name="mobileo_linattn_kv", input_names=["k", "v"], output_names=["part"],
            source=_LA_KV_BODY, ensure_row_contiguous=False,
        )
        self.la_out = factory(
            name="mobileo_linattn_out", input_names=["q", "kv", "eps"], output_names=["out"],
            source=_LA_OUT_BODY, ensure_row_contiguous=False,
        )

    # -- depthwise ---------------------------------------------------------
    @staticmethod
    def depthwise_supported(x: mx.array, w: mx.array, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
        return (
            x.ndim == 4 and w.ndim == 4 and w.shape[-1] == 1
            and x.dtype in SUPPORTED_DTYPES and w.shape[0] % x.shape[-1] == 0
            and all(p >= 0 for p in padding) and all(s >= 1 for s in stride)
            and conv_out_size(x.shape[1], w.shape[1], stride[0], padding[0]) > 0
            and conv_out_size(x.shape[2], w.shape[2], stride[1], padding[1]) > 0
        )

    def depthwise(self, x: mx.array, w: mx.array, bias: mx.array | None = None, stride=(1, 1), padding=(0, 0),
                  glu: bool = False) -> mx.array:
        """x [B,H,W,C] NHWC, w [C*M,KH,KW,1] -> [B,HO,WO,C*M] (or C*M/2 with ``glu``)."""
        B, H, W, C = x.shape
        CO, KH, KW, _ = w.shape
        M = CO // C
        SH, SW = stride
        PH, PW = padding
        HO, WO = conv_out_size(H, KH, SH, PH), conv_out_size(W, KW, SW, PW)
        cout = CO // 2 if glu else CO
        tw = 4 if WO >= 4 else 1
        kind = "glu" if glu else ("plain" if bias is None else "bias")
        if glu and bias is None:
            raise ValueError("glu depthwise needs a bias")
        w = w.astype(x.dtype) if w.dtype != x.dtype else w
        inputs = [x, w] + ([] if bias is None else [bias.astype(x.dtype) if bias.dtype != x.dtype else bias])
        (out,) = self.dw[kind](
            inputs=inputs,
            template=[("T", x.dtype), ("KH", KH), ("KW", KW), ("SH", SH), ("SW", SW), ("PH", PH), ("PW", PW),
                      ("M", M), ("TW", tw), ("GLU", glu)],
            grid=(cout, _ceil_div(WO, tw), B * HO),
            threadgroup=DW_THREADGROUP,
            output_shapes=[(B, HO, WO, cout)],
            output_dtypes=[x.dtype],
        )
        return out

    # -- linear attention ----------------------------------------------------
    @staticmethod
    def linear_attention_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
        return (
            q.ndim == 4 and k.ndim == 4 and v.ndim == 4
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] and k.shape[2] > 0 and q.shape[2] > 0
            and q.shape[3] * v.shape[3] <= LA_MAX_DD
            and 4 * LA_ROWS * (q.shape[3] + v.shape[3]) <= TG_MEMORY // 2  # pass 1 staging
            and all(a.dtype in SUPPORTED_DTYPES for a in (q, k, v))
        )

    def linear_attention(self, q: mx.array, k: mx.array, v: mx.array, eps: float = 1e-15) -> mx.array:
        B, H, NQ, D = q.shape
        NK, DV = k.shape[2], v.shape[3]
        S = _ceil_div(NK, LA_CHUNK)
        (part,) = self.la_kv(
            inputs=[k, v],
            template=[("D", D), ("DV", DV), ("TG", LA_TG), ("ROWS", LA_ROWS), ("CH", LA_CHUNK)],
            grid=(LA_TG, S, B * H),
            threadgroup=(LA_TG, 1, 1),
            output_shapes=[(B * H, S, D * DV + D)],
            output_dtypes=[mx.float32],
        )
        kv = part.sum(axis=1) if S > 1 else part.reshape(B * H, D * DV + D)
        threads = 32 * LA_SIMDGROUPS
        (out,) = self.la_out(
            inputs=[q, kv, mx.array(eps, dtype=mx.float32)],
            template=[("T", v.dtype), ("D", D), ("DV", DV), ("RB", LA_ROWS_OUT)],
            grid=(threads, _ceil_div(NQ, LA_ROWS_OUT), B * H),
            threadgroup=(threads, 1, 1),
            output_shapes=[(B, H, NQ, DV)],
            output_dtypes=[v.dtype],
        )
        return out


_metal: MetalKernels | None = None


def kernels() -> MetalKernels:
    """The process-wide kernels built with ``mx.fast.metal_kernel`` (built lazily, once)."""
    global _metal
    if _metal is None:
        _metal = MetalKernels()
    return _metal


__all__ = ["MetalKernels", "kernels", "conv_out_size", "SUPPORTED_DTYPES"]
