"""Ways to run the DC-AE decoder (``models.dcae.DCAEDecoder``) on a picture, beside the plain
``vae(latents)`` (as diffusers' ``AutoencoderDC`` offers ``enable_tiling``):

* :func:`decode_in_row_bands`: exactly ``vae(latents)``, with the layers that only look at
  neighbouring rows run band by band, each band evaluated before the next: their
  high-resolution temporaries (~1 GB in float32 at 512^2) no longer set the peak memory;
* :func:`decode_tiled`: overlapping latent tiles decoded one at a time and blended, which
  bounds memory at any size but only approximates the plain decode (attention is global in
  a tile).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .backends import tuning
from .models.dcae import SPATIAL_SCALE


def in_row_bands(fn: Callable[[mx.array], mx.array], x: mx.array, halo: int, scale: int = 1) -> mx.array:
    """``fn(x)`` for a row-local ``fn`` (output row r reads input rows within ``halo`` of
    r // ``scale``), computed in bands of about ``tuning.BAND_PIXELS`` output pixels, each
    evaluated before the next is built. Exact: a band reads its rows plus the halo and the
    halo's outputs are cropped (the zero padding a band sees at its cut only reaches cropped
    rows)."""
    batch, height, width = x.shape[:3]
    rows = max(1, tuning.BAND_PIXELS // (batch * width * scale * scale))
    if rows >= height:
        return fn(x)
    bands = []
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        lo, hi = max(0, start - halo), min(height, stop + halo)
        y = fn(x[:, lo:hi])[:, (start - lo) * scale : (stop - lo) * scale]
        mx.eval(y)
        bands.append(y)
    return mx.concatenate(bands, axis=1)


def decode_in_row_bands(vae, latents: mx.array) -> mx.array:
    """``vae(latents)``, exactly, with every layer that declares its row halo (``row_halo``,
    ``row_scale``: ResBlocks, upsamplers) and the output head run in row bands."""
    x = vae.embed(latents)
    for stage in reversed(vae.up_blocks):
        for layer in stage:
            halo = getattr(layer, "row_halo", None)
            x = layer(x) if halo is None else in_row_bands(layer, x, halo, layer.row_scale)
    return in_row_bands(vae.head, x, vae.head_row_halo)


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) latent spans of ``tile`` length covering ``size``, ``tile - overlap``
    apart; the last span is pulled back to end at the border, so every tile is full."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _blend_weights(spans: list[tuple[int, int]], scale: int) -> list[np.ndarray]:
    """Per-span 1-D pixel weights: linear ramps across each overlap with a neighbour,
    normalized so that the weights of all spans sum to 1 at every pixel."""
    weights = []
    for index, (start, end) in enumerate(spans):
        length = (end - start) * scale
        weight = np.ones(length, dtype=np.float64)
        if index > 0:  # ramp up over the overlap with the previous tile
            lead = (spans[index - 1][1] - start) * scale
            weight[:lead] = np.minimum(weight[:lead], (np.arange(lead) + 0.5) / lead)
        if index < len(spans) - 1:  # ramp down over the overlap with the next tile
            trail = (end - spans[index + 1][0]) * scale
            ramp = (np.arange(trail)[::-1] + 0.5) / trail
            weight[length - trail :] = np.minimum(weight[length - trail :], ramp)
        weights.append(weight)
    total = np.zeros(spans[-1][1] * scale)
    for (start, _), weight in zip(spans, weights):
        total[start * scale : start * scale + len(weight)] += weight
    return [w / total[s * scale : s * scale + len(w)] for (s, _), w in zip(spans, weights)]


def decode_tiled(
    decode: Callable[[mx.array], mx.array],
    latents: mx.array,
    tile: int = 16,
    overlap: int = 4,
    scale: int = SPATIAL_SCALE,
) -> mx.array:
    """Seamless tiled decoding: ``decode`` (a decoder, or any latents [B,h,w,C] -> images
    [B,scale*h,scale*w,c]) runs on overlapping ``tile`` x ``tile`` latent tiles (``overlap``
    latents shared by neighbours), one at a time (evaluated, to bound memory), and the tiles are
    blended with linear ramps in the overlaps (weights summing to one).

    Tiles see less context than the whole image (attention is global in a tile), so the
    result approximates ``decode(latents)``; it is ``decode(latents)`` when one tile fits."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    batch, height, width, _ = latents.shape
    rows, cols = _tile_spans(height, tile, overlap), _tile_spans(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(latents)

    row_weights, col_weights = _blend_weights(rows, scale), _blend_weights(cols, scale)
    image = None
    for (top, bottom), row_weight in zip(rows, row_weights):
        for (left, right), col_weight in zip(cols, col_weights):
            piece = decode(latents[:, top:bottom, left:right, :]).astype(mx.float32)
            if image is None:
                image = mx.zeros((batch, height * scale, width * scale, piece.shape[-1]), mx.float32)
            weight = mx.array((row_weight[:, None] * col_weight[None, :])[None, :, :, None], mx.float32)
            y0, x0 = top * scale, left * scale
            y1, x1 = y0 + piece.shape[1], x0 + piece.shape[2]
            image[:, y0:y1, x0:x1, :] = image[:, y0:y1, x0:x1, :] + piece * weight
            mx.eval(image)
    return image.astype(latents.dtype)
