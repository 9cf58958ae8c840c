"""Depthwise (and channel-multiplier grouped) convolutions, NHWC: the custom kernels beside
their plain-MLX forms. Which one runs is the backend's choice (``mobileo_mlx.backends``);
nothing here looks at the backend.

* :func:`reference`: ``mx.conv2d(groups=C)`` + bias, what every other form is held to;
* :func:`shift_add`: the plain-MLX twin for MLX's CPU backend, where ``conv2d(groups=C)`` is
  slow: the sum over kernel taps of shifted slices times per-channel weights, in small
  compiled kernels of a few taps each;
* :func:`native`: the C kernel (``native/depthwise.c``) as a node of MLX's graph
  (``kernels.primitives``), where :func:`native_supported`;
* :func:`metal` / :func:`metal_glu`: the Metal kernels (``kernels.metal``), the latter with
  the GLU epilogue of GLUMBConv fused (conv + bias, then ``a * SiLU(g)`` over the two channel
  halves), where :func:`metal_supported`.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from mobileo_mlx.kernels import primitives


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def reference(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1, padding=None) -> mx.array:
    """x [B,H,W,C], weight [C*m,kh,kw,1] (output channel o reads input channel o // m), bias
    [C*m] or None; ``padding`` defaults to ``kh // 2``."""
    pad = weight.shape[1] // 2 if padding is None else padding
    y = mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])
    return y + bias if bias is not None else y


def glu(y: mx.array) -> mx.array:
    """Split channels in half (a, g) -> a * SiLU(g)."""
    a, g = mx.split(y, 2, axis=-1)
    return a * (g * mx.sigmoid(g))


def glu_reference(x: mx.array, weight: mx.array, bias: mx.array, padding=None) -> mx.array:
    """GLUMBConv's middle: depthwise conv (stride 1) + bias over 2C channels, then
    a * SiLU(g) over the halves: x [B,H,W,2C] -> [B,H,W,C]."""
    return glu(reference(x, weight, bias, 1, padding))


# ------------------------------------------------------------------ shift-and-add twin
@functools.lru_cache(maxsize=None)
def _taps_kernel(taps: int, accumulate: bool, with_bias: bool):
    """A compiled fn([acc,] s1, w1, ..., s_taps, w_taps[, bias]) -> [acc +] sum s_i * w_i [+ bias]."""

    def fn(*args):
        args = list(args)
        acc = args.pop(0) if accumulate else None
        for i in range(taps):
            term = args[2 * i] * args[2 * i + 1]
            acc = term if acc is None else acc + term
        return acc + args[2 * taps] if with_bias else acc

    return mx.compile(fn)


def shift_add_supported(x: mx.array, weight: mx.array) -> bool:
    return (x.ndim == 4 and weight.ndim == 4 and weight.shape[-1] == 1 and weight.shape[0] % x.shape[-1] == 0
            and mx.issubdtype(x.dtype, mx.floating))


def shift_add(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1, padding=None,
              taps_per_kernel: int = 4) -> mx.array:
    """:func:`reference` as a sum over the kernel taps of shifted (strided) slices of the padded
    input times per-channel tap weights, ``taps_per_kernel`` taps per compiled kernel (one
    compiled sum of every tap is cut by MLX's fuser into slower kernels of its own; the
    explicit ones sum the same products in the same order). float16 / bfloat16 accumulate in
    float32. For :func:`shift_add_supported` shapes."""
    kh, kw = weight.shape[1], weight.shape[2]
    (sh, sw), (ph, pw) = _pair(stride), _pair(kh // 2 if padding is None else padding)
    dtype = x.dtype
    if dtype in (mx.float16, mx.bfloat16):
        x = x.astype(mx.float32)
    w = weight.astype(x.dtype)
    m = weight.shape[0] // x.shape[-1]
    if m > 1:
        x = mx.repeat(x, m, axis=-1)  # output channel o reads input channel o // m
    _, height, width, channels = x.shape
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    taps = mx.contiguous(w.reshape(channels, kh * kw).T)  # [kh*kw, C], each tap vector contiguous
    terms = [(x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :], taps[i * kw + j])
             for i in range(kh) for j in range(kw)]
    acc = None
    for start in range(0, len(terms), taps_per_kernel):
        group = terms[start : start + taps_per_kernel]
        args = [a for term in group for a in term]
        with_bias = bias is not None and start + taps_per_kernel >= len(terms)
        if with_bias:
            args.append(bias.astype(x.dtype))
        kernel = _taps_kernel(len(group), acc is not None, with_bias)
        acc = kernel(*args) if acc is None else kernel(acc, *args)
    return acc.astype(dtype)


# ------------------------------------------------------------------ custom kernels
def native_supported(x: mx.array, weight: mx.array, bias: mx.array | None, stride=1, padding=None) -> bool:
    """Whether :func:`native` takes this conv (float32, one output channel per input channel,
    channels a multiple of 8, the graph nodes built)."""
    pad = weight.shape[1] // 2 if padding is None else padding
    return primitives.depthwise_supported(x, weight, bias, stride, pad)


def native(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1, padding=None) -> mx.array:
    """:func:`reference` by the C kernel, a node of MLX's graph on the current CPU stream."""
    pad = weight.shape[1] // 2 if padding is None else padding
    return primitives.depthwise_conv2d(x, weight, bias, stride, pad)


def metal_supported(x: mx.array, weight: mx.array, stride=1, padding=None) -> bool:
    from mobileo_mlx.kernels.metal import MetalKernels

    return MetalKernels.depthwise_supported(x, weight, _pair(stride), _pair(weight.shape[1] // 2 if padding is None
                                                                              else padding))


def metal(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1, padding=None) -> mx.array:
    """:func:`reference` by the Metal kernel (conv + bias in one pass)."""
    from mobileo_mlx.kernels.metal import kernels

    pad = weight.shape[1] // 2 if padding is None else padding
    return kernels().depthwise(x, weight, bias, _pair(stride), _pair(pad))


def metal_glu(x: mx.array, weight: mx.array, bias: mx.array, padding=None) -> mx.array:
    """:func:`glu_reference` by the Metal kernel: conv, bias, split and gate in one pass (the
    2C-channel intermediate never reaches memory)."""
    from mobileo_mlx.kernels.metal import kernels

    pad = weight.shape[1] // 2 if padding is None else padding
    return kernels().depthwise(x, weight, bias, (1, 1), _pair(pad), glu=True)


__all__ = ["glu", "glu_reference", "metal", "metal_glu", "metal_supported", "native", "native_supported",
           "reference", "shift_add", "shift_add_supported"]
