"""Two CPU streams: the way element-wise work gets the second core.

MLX's CPU backend runs each stream on its own thread, and everything but BLAS on that one
thread. Independent halves of large element-wise work (the two images of a CFG batch, two
channel halves, two halves of a weight) built on two streams therefore run on two cores.
This relies on OpenBLAS's idle threads sleeping rather than spinning (``mobileo_mlx._blas``
sets ``OPENBLAS_THREAD_TIMEOUT``): a spinning BLAS thread holds the second core after every
matmul.
"""

from __future__ import annotations

import contextvars
import functools

import mlx.core as mx


@functools.lru_cache(maxsize=None)
def helper_stream() -> mx.Stream:
    """The second CPU stream (created once)."""
    return mx.new_stream(mx.cpu)


# True inside a piece that cpu_pieces placed on one stream: work built there must not split
# again (the other stream is busy with the other piece).
_PINNED = contextvars.ContextVar("mobileo_mlx_pinned_stream", default=False)


def may_split() -> bool:
    """Whether work being built now may split itself over the two CPU streams."""
    return mx.default_device() == mx.cpu and not _PINNED.get()


def cpu_pieces(count: int, build) -> list:
    """``[build(0), ..., build(count - 1)]``, piece i built on CPU stream i % 2 (the default
    stream, then :func:`helper_stream`). ``build`` must create *everything* of its piece, the
    slicing of its inputs included: an op created outside would run on the default stream and
    make the helper wait for it. The caller joins the pieces once, at the end (a consumer of
    the helper's output placed earlier makes the default stream wait there and serialises the
    two). Where splitting is not allowed (:func:`may_split`), the pieces are built in order on
    the current stream."""
    if not may_split():
        return [build(i) for i in range(count)]
    streams = (mx.default_stream(mx.cpu), helper_stream())
    pieces = []
    for i in range(count):
        token = _PINNED.set(True)
        try:
            with mx.stream(streams[i % 2]):
                pieces.append(build(i))
        finally:
            _PINNED.reset(token)
    return pieces


def split_in_two(build, size: int, axis: int) -> mx.array:
    """``build(slice(0, size))`` computed as ``build(first half)`` and ``build(second half)``,
    one per CPU stream, joined along ``axis``. ``build(part)`` slices its own inputs with
    ``part`` (inside the piece, see :func:`cpu_pieces`) along a dimension whose slices it
    treats independently (batch items, channels that do not mix, output columns), so the
    result is that of one call."""
    half = size // 2
    parts = cpu_pieces(2, lambda i: build(slice(0, half) if i == 0 else slice(half, size)))
    return mx.concatenate(parts, axis=axis)
