"""Time the attention nodes against the MLX forms they replace, at the full-size model's shapes.

    python -m benchmarks.attention [--repeats 7] [--caption 64]

* ``attn1`` / ``attn2``: one DiT block's SANA attentions (CFG batch 2, 16² latents = 256 tokens,
  D = 1152) with 8-bit weights as the ``mixed`` recipe stores them and bfloat16 products (the
  8-bit GEMM node), projections included; ``attn2`` against ``--caption`` caption tokens with a
  key mask. ``core``: the attention alone (the head views in, the merged layout out).
* ``dcae``: the DC-AE decoder's LiteMLA cores (its interleaved q/k/v views, one image at 512²).

``mlx`` is the path before the nodes (``tuning.ATTENTION_NATIVE_MIN_MACS`` raised past every
call: the fast-softmax MLX form / the two-stream linear attention), ``node`` the node; the two
alternate call by call, milliseconds, best of ``--repeats`` rounds of a few calls.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import measure  # noqa: F401  (mobileo_mlx, hence the BLAS routing, before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mobileo_mlx import backends  # noqa: E402
from mobileo_mlx.backends import tuning  # noqa: E402
from mobileo_mlx.models import sana  # noqa: E402

NEVER = 1 << 62


def _timed(fn, calls: int) -> float:
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(calls):
        mx.eval(fn())
    return (time.perf_counter() - start) / calls * 1e3


def compare(name: str, fn, repeats: int, calls: int = 5) -> None:
    """Alternates the MLX form and the node; prints the best of each."""
    native = tuning.ATTENTION_NATIVE_MIN_MACS
    best = {"mlx": float("inf"), "node": float("inf")}
    try:
        for _ in range(repeats):
            for path, threshold in (("mlx", NEVER), ("node", native)):
                tuning.ATTENTION_NATIVE_MIN_MACS = threshold
                best[path] = min(best[path], _timed(fn, calls))
    finally:
        tuning.ATTENTION_NATIVE_MIN_MACS = native
    print(f"{name:44s} mlx {best['mlx']:8.2f} ms   node {best['node']:8.2f} ms   {best['mlx'] / best['node']:5.1f}x")


def _dit_block(config: sana.SanaConfig) -> sana.SanaTransformerBlock:
    block = sana.SanaTransformerBlock(config)
    block.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.03, block.parameters()))
    nn.quantize(block, group_size=64, bits=8)
    return backends.accelerate(block, "dit", matmul="bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--caption", type=int, default=64, help="caption tokens (attn2's keys)")
    args = parser.parse_args()
    mx.set_cache_limit(tuning.STAGE_CACHE_BYTES)  # as the pipeline's stages run

    config = sana.SanaConfig()
    block = _dit_block(config)
    dim, tokens = config.inner_dim, 256
    x = mx.random.normal((2, tokens, dim))
    context = mx.random.normal((2, args.caption, dim))
    mask = mx.concatenate([mx.ones((2, args.caption - 7)), mx.zeros((2, 7))], axis=1)  # padded captions
    key_bias = ((1 - mask) * sana.MASKED_KEY_BIAS)[:, None, None, :]
    keys, values = block.attn2.keys_values(context)
    mx.eval(block.parameters(), x, keys, values, key_bias)

    compare("attn1 (DiT block, CFG pair, 36 x 32 heads)", lambda: block.attn1(x), args.repeats)
    compare(f"attn2 (DiT block, CFG pair, 16 x 72, L={args.caption})",
            lambda: block.attn2(x, keys, values, key_bias), args.repeats)
    q1 = sana._split_heads(mx.random.normal((2, tokens, dim)), config.num_attention_heads)
    k1 = sana._split_heads(mx.random.normal((2, tokens, dim)), config.num_attention_heads)
    v1 = sana._split_heads(mx.random.normal((2, tokens, dim)), config.num_attention_heads)
    q2 = sana._split_heads(mx.random.normal((2, tokens, dim)), config.num_cross_attention_heads)
    mx.eval(q1, k1, v1, q2)
    linear = block.attn1.attention
    compare("  attn1 core", lambda: sana._merge_heads(linear(q1, k1, v1)), args.repeats)
    compare("  attn2 core", lambda: sana._merge_heads(block.attn2.attention(q2, keys, values, block.attn2.scale, key_bias)), args.repeats)

    for groups, side in ((64, 16), (64, 32), (32, 64)):  # the decoder's three EfficientViT stages
        qkv = mx.random.normal((1, side * side, groups, 3 * 32)).transpose(0, 2, 1, 3)  # as the model splits it
        mx.eval(qkv)
        compare(f"dcae LiteMLA core {groups} groups x 32, {side}x{side}",
                lambda: linear(*mx.split(qkv, 3, axis=-1)).transpose(0, 2, 1, 3).reshape(1, side, side, -1),
                args.repeats, calls=3)


if __name__ == "__main__":
    main()
