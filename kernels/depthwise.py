"""Depthwise (and channel-multiplier grouped) convolutions, NHWC / NLC.

Model code calls these functions (never ``mx.conv2d(groups=C)`` directly) so the
path is chosen by backend in one place:

* Metal: the fused custom kernel (``kernels.metal``: conv + bias [+ a*SiLU(g)] in one pass);
* CPU: the plain-MLX *twin*, a shift-and-add (sum over kernel taps of shifted slices
  times per-channel weights, in small compiled kernels of four taps), 3-6x faster than
  ``mx.conv2d`` with ``groups=C`` on MLX's CPU backend, large convs split over two CPU
  streams;
* CUDA (or Metal with ``MOBILEO_MLX_KERNELS=twin``): ``mx.conv2d`` / ``mx.conv1d`` with the
  epilogue (bias [+ a*SiLU(g)]) fused by ``mx.compile``.

``*_reference`` are the plain ``mx.conv2d`` / ``mx.conv1d`` formulations the tests hold the
twins and kernels to.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from mobileo_mlx import platform

from mobileo_mlx.kernels import _native
from mobileo_mlx.kernels._dispatch import mode, on_cpu, use_metal


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# ---------------------------------------------------------------------------
# References (mx.conv2d / mx.conv1d)
# ---------------------------------------------------------------------------
def depthwise_conv2d_reference(x, weight, bias=None, stride=1, padding=None) -> mx.array:
    pad = weight.shape[1] // 2 if padding is None else padding
    y = mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])
    return y + bias if bias is not None else y


def depthwise_conv1d_reference(x, weight, bias=None, padding=None) -> mx.array:
    pad = weight.shape[1] // 2 if padding is None else padding
    y = mx.conv1d(x, weight, padding=pad, groups=x.shape[-1])
    return y + bias if bias is not None else y


def glu(y: mx.array) -> mx.array:
    """Split channels in half (a, g) -> a * SiLU(g)."""
    a, g = mx.split(y, 2, axis=-1)
    return a * (g * mx.sigmoid(g))


def glu_depthwise_conv2d_reference(x, weight, bias, padding=None) -> mx.array:
    return glu(depthwise_conv2d_reference(x, weight, bias, 1, padding))


# ---------------------------------------------------------------------------
# CPU twin: shift-and-add in small compiled kernels
# ---------------------------------------------------------------------------
# The conv is a sum over kernel taps of shifted slices times per-channel weights. One
# mx.compile of the whole sum is slow on MLX's CPU backend: its fuser cuts the long chain
# into kernels of its own choosing, with strided tap vectors. Explicit kernels of
# TAPS_PER_KERNEL taps each (acc + s1*w1 + ... + s4*w4, contiguous tap vectors) are
# 1.6-2x faster (7x7 on 64x64x384: 51 -> 27 ms; 3x3 on 2x16x16x2880: 9.6 -> 4.8 ms) and
# bit-identical: the same products summed in the same order. 4 or 5 taps measured best,
# 8 as slow as the single graph.
TAPS_PER_KERNEL = 4


@functools.lru_cache(maxsize=None)
def _taps_kernel(taps: int, accumulate: bool, epilogue: str):
    """A compiled fn([acc,] s1, w1, ..., s_taps, w_taps[, bias]) -> [acc +] sum s_i * w_i [+ bias [glu]]."""

    def fn(*args):
        args = list(args)
        acc = args.pop(0) if accumulate else None
        for i in range(taps):
            term = args[2 * i] * args[2 * i + 1]
            acc = term if acc is None else acc + term
        if epilogue != "plain":
            acc = acc + args[2 * taps]
        if epilogue == "glu":
            acc = glu(acc)
        return acc

    return mx.compile(fn)


def _shift_add(x, w, bias, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, m: int, epilogue: str):
    """x [B,H,W,C], w [C*m,kh,kw,1], bias [C*m] or None -> [B,HO,WO,C*m] (or half of it for GLU)."""
    dtype = x.dtype
    if dtype in (mx.float16, mx.bfloat16):  # accumulate in fp32, as the Metal kernel does
        x = x.astype(mx.float32)
    w = w.astype(x.dtype)
    if m > 1:
        x = mx.repeat(x, m, axis=-1)  # output channel o reads input channel o // m
    _, H, W, C = x.shape
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    HO = (H + 2 * ph - kh) // sh + 1
    WO = (W + 2 * pw - kw) // sw + 1
    taps = mx.contiguous(w.reshape(C, kh * kw).T)  # [kh*kw, C], each tap vector contiguous
    terms = [(x[:, i : i + sh * (HO - 1) + 1 : sh, j : j + sw * (WO - 1) + 1 : sw, :], taps[i * kw + j])
             for i in range(kh) for j in range(kw)]
    acc = None
    for start in range(0, len(terms), TAPS_PER_KERNEL):
        group = terms[start : start + TAPS_PER_KERNEL]
        last = start + TAPS_PER_KERNEL >= len(terms)
        args = [a for term in group for a in term]
        tail = epilogue if last else "plain"
        if tail != "plain":
            args.append(bias.astype(x.dtype))
        kernel = _taps_kernel(len(group), acc is not None, tail)
        acc = kernel(*args) if acc is None else kernel(acc, *args)
    return acc.astype(dtype)


def _twin2d_whole(x, weight, bias, stride, padding, epilogue) -> mx.array:
    kh, kw = weight.shape[1], weight.shape[2]
    (sh, sw), (ph, pw) = stride, padding
    m = weight.shape[0] // x.shape[-1]
    return _shift_add(x, weight, bias, kh, kw, sh, sw, ph, pw, m, epilogue)


# MLX runs element-wise work on one thread per CPU stream: a large conv runs as two channel
# halves, one per stream (platform.cpu_pieces), joined by one copy. Below this many
# multiply-adds the split costs more than it saves.
SPLIT_MIN_MACS = 1 << 22


# Large stride/padding convs with one output channel per input channel run in C
# (native/depthwise.c: 8-lane vectors, every core), outside MLX's graph: the input is
# evaluated and read in place, the output written into a fresh MLX array. Not inside a piece of
# platform.cpu_pieces (an evaluation there would serialise the two streams) nor inside
# mx.compile / mx.grad; with fewer multiply-adds the synchronisation costs more than it saves.
NATIVE_MIN_MACS = 1 << 21


def _native2d(x, weight, bias, stride, padding) -> mx.array | None:
    batch, height, width, channels = x.shape
    kh, kw = weight.shape[1], weight.shape[2]
    if (not _native.enabled() or x.dtype != mx.float32 or weight.shape[0] != channels or channels % 8
            or x.size * kh * kw // (stride[0] * stride[1]) < NATIVE_MIN_MACS
            or not platform.may_split_over_streams()):
        return None
    out_h = (height + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    taps = weight[..., 0].transpose(1, 2, 0).astype(mx.float32)  # [kh, kw, C]
    bias = None if bias is None else bias.astype(mx.float32)
    if out_h < 1 or out_w < 1 or not _native.evaluate(x, taps, *([] if bias is None else [bias])):
        return None
    image, taps = _native.c_view(x, np.float32), _native.c_view(taps, np.float32)
    shift = None if bias is None else _native.c_view(bias, np.float32)
    # The output is a fresh MLX array written in place: its buffer comes from MLX's cache
    # (a fresh NumPy array is page-faulted at first touch, and copying it costs a pass more).
    out = mx.zeros((batch, out_h, out_w, channels), dtype=mx.float32)
    mx.eval(out)
    target = np.asarray(out)
    if not (target.flags.writeable and target.flags.c_contiguous):
        return None
    code = _native.library().mobileo_depthwise_conv2d(
        image.ctypes.data, batch, height, width, channels, taps.ctypes.data, kh, kw,
        None if shift is None else shift.ctypes.data, stride[0], stride[1], padding[0], padding[1],
        target.ctypes.data, out_h, out_w)
    return out if code == 0 else None


def _twin2d(x, weight, bias, stride, padding, epilogue, native: bool = True) -> mx.array:
    if native and epilogue != "glu":
        native = _native2d(x, weight, bias, stride, padding)
        if native is not None:
            return native
    channels = x.shape[-1]
    m = weight.shape[0] // channels
    macs = x.size * m * weight.shape[1] * weight.shape[2] // (stride[0] * stride[1])
    if (epilogue == "glu" or channels < 2 or macs < SPLIT_MIN_MACS
            or not platform.may_split_over_streams()):
        return _twin2d_whole(x, weight, bias, stride, padding, epilogue)
    half = channels // 2

    def piece(i: int) -> mx.array:
        lo, hi = (0, half) if i == 0 else (half, channels)
        return _twin2d_whole(x[..., lo:hi], weight[lo * m : hi * m], None if bias is None else bias[lo * m : hi * m],
                             stride, padding, epilogue)

    return mx.concatenate(platform.cpu_pieces(2, piece), axis=-1)


@functools.lru_cache(maxsize=None)
def _conv_epilogue(ndim: int, stride, padding, epilogue: str):
    """GPU twin (CUDA, or Metal with the kernels switched off): MLX's grouped conv, with the
    epilogue (bias [+ a*SiLU(g)]) fused into one compiled elementwise pass."""

    def fn(x, w, *bias):
        if ndim == 1:
            y = mx.conv1d(x, w, padding=padding, groups=x.shape[-1])
        else:
            y = mx.conv2d(x, w, stride=stride, padding=padding, groups=x.shape[-1])
        if epilogue != "plain":
            y = y + bias[0]
        return glu(y) if epilogue == "glu" else y

    return mx.compile(fn)


def _gpu_twin(x, weight, bias, stride, padding, epilogue) -> mx.array:
    fn = _conv_epilogue(x.ndim - 2, stride, padding, epilogue)
    return fn(x, weight) if bias is None else fn(x, weight, bias)


def _fast_path_ok(x, weight) -> bool:
    return (x.ndim == 4 and weight.ndim == 4 and weight.shape[-1] == 1 and weight.shape[0] % x.shape[-1] == 0
            and mx.issubdtype(x.dtype, mx.floating))


# ---------------------------------------------------------------------------
# Public API (models call these)
# ---------------------------------------------------------------------------
def depthwise_conv2d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int | None = None,
) -> mx.array:
    """Grouped conv with ``groups = C_in``: x [B,H,W,C_in], weight [C_out,kh,kw,1]
    (C_out a multiple of C_in; output channel o reads input channel o // (C_out/C_in)),
    bias [C_out] or None. ``padding`` defaults to ``kh // 2`` (same size at stride 1)."""
    pad = weight.shape[1] // 2 if padding is None else padding
    st, pd = _pair(stride), _pair(pad)
    if use_metal():
        from mobileo_mlx.kernels.metal import MetalKernels, kernels

        if MetalKernels.depthwise_supported(x, weight, st, pd):
            return kernels().depthwise(x, weight, bias, st, pd)
    if mode() != "reference":
        epilogue = "plain" if bias is None else "bias"
        if on_cpu() and _fast_path_ok(x, weight):
            return _twin2d(x, weight, bias, st, pd, epilogue)
        return _gpu_twin(x, weight, bias, st, pd, epilogue)
    return depthwise_conv2d_reference(x, weight, bias, stride, pad)


def depthwise_conv2d_twin(
    x: mx.array, weight: mx.array, bias: mx.array | None = None, stride: int = 1, padding: int | None = None
) -> mx.array:
    """:func:`depthwise_conv2d`'s plain-MLX CPU twin (the shift-and-add, never the native
    kernel): what ``kernels.primitives.depthwise_conv2d`` falls back to."""
    pad = weight.shape[1] // 2 if padding is None else padding
    st, pd = _pair(stride), _pair(pad)
    epilogue = "plain" if bias is None else "bias"
    if _fast_path_ok(x, weight):
        return _twin2d(x, weight, bias, st, pd, epilogue, native=False)
    return _gpu_twin(x, weight, bias, st, pd, epilogue)


def glu_depthwise_conv2d(x: mx.array, weight: mx.array, bias: mx.array, padding: int | None = None) -> mx.array:
    """GLUMBConv's middle: depthwise conv (stride 1) + bias over 2C channels, then split the
    channels in half (a, g) -> a * SiLU(g). x [B,H,W,2C], weight [2C,k,k,1], bias [2C] -> [B,H,W,C]."""
    pad = weight.shape[1] // 2 if padding is None else padding
    pd = _pair(pad)
    if use_metal():
        from mobileo_mlx.kernels.metal import MetalKernels, kernels

        if weight.shape[0] == x.shape[-1] and MetalKernels.depthwise_supported(x, weight, (1, 1), pd):
            return kernels().depthwise(x, weight, bias, (1, 1), pd, glu=True)
    if mode() != "reference":
        if on_cpu() and _fast_path_ok(x, weight):
            return _twin2d(x, weight, bias, (1, 1), pd, "glu")
        return _gpu_twin(x, weight, bias, (1, 1), pd, "glu")
    return glu_depthwise_conv2d_reference(x, weight, bias, pad)


def depthwise_conv1d(
    x: mx.array, weight: mx.array, bias: mx.array | None = None, padding: int | None = None
) -> mx.array:
    """Depthwise conv over a sequence: x [B,L,C], weight [C,k,1], bias [C] or None."""
    pad = weight.shape[1] // 2 if padding is None else padding
    if x.ndim == 3 and weight.ndim == 3 and weight.shape[-1] == 1:
        x4 = x[:, None]                    # [B, 1, L, C]
        w4 = weight[:, None]               # [C, 1, k, 1]
        if use_metal():
            from mobileo_mlx.kernels.metal import MetalKernels, kernels

            if MetalKernels.depthwise_supported(x4, w4, (1, 1), (0, pad)):
                return kernels().depthwise(x4, w4, bias, (1, 1), (0, pad))[:, 0]
        if mode() != "reference":
            epilogue = "plain" if bias is None else "bias"
            if on_cpu() and _fast_path_ok(x4, w4):
                return _twin2d(x4, w4, bias, (1, 1), (0, pad), epilogue)[:, 0]
            return _gpu_twin(x, weight, bias, 1, pad, epilogue)
    return depthwise_conv1d_reference(x, weight, bias, pad)


__all__ = [
    "depthwise_conv2d", "depthwise_conv2d_twin", "depthwise_conv1d", "glu_depthwise_conv2d",
    "depthwise_conv2d_reference", "depthwise_conv1d_reference", "glu_depthwise_conv2d_reference", "glu",
]
