"""The native CPU kernels as MLX graph nodes (kernels/primitives.py, option a) against the same C
called through ctypes outside the graph (kernels/gelu.py, depthwise.py, quantized_gemv.py and
the bf16 BLAS hook, option b) and against their plain-MLX twins, at Mobile-O's shapes.

    python -m benchmarks.primitives [--rounds 9] [--quick] [--json out.json]

One process; every round times each path once, in a rotated order (A/B interleaved), so a
neighbour's load hits all paths alike; the table gives the median per call (ms) and, for the
graph node, the spread (min-max) of its rounds and the median over rounds of node / ctypes
(timed back to back in each round). Each time is one ``mx.eval`` of one call on
evaluated inputs: building the graph, evaluating it, and for ctypes its own synchronisation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)
import mlx.core as mx

from mobileo_mlx.kernels import bf16_matmul as bf16
from mobileo_mlx.kernels import depthwise as dw
from mobileo_mlx.kernels import gelu as native_gelu
from mobileo_mlx.kernels import primitives as prim
from mobileo_mlx.kernels import quantized_gemv as qgemv
from mobileo_mlx.models.activations import gelu_fast


def _ctypes_gelu(x):
    # the in-place ctypes kernel, without its size threshold (for the tiny case)
    saved, native_gelu.MIN_VALUES = native_gelu.MIN_VALUES, 0
    try:
        return native_gelu.gelu_in_place(x, gelu_fast)
    finally:
        native_gelu.MIN_VALUES = saved


def _ctypes_depthwise(x, w, b, stride, pad):
    out = dw._native2d(x, w, b, (stride, stride), (pad, pad))
    assert out is not None, "the ctypes depthwise kernel declined"
    return out


def _ctypes_bf16(a, b):
    with bf16.bf16_products():
        out = a @ b
        mx.eval(out)  # the hook serves only products evaluated inside the context
    return out


def cases(quick: bool, rounds: int):
    """(group, name, {path: thunk}) with inputs evaluated."""
    out = []
    x = mx.random.normal((1, 4096, 3072)) * 3  # 12.6 M values (a FastViTHD fc1 output)
    # the ctypes GELU overwrites its input: a fresh copy for every call (GELU applied again and
    # again drives the negative values into subnormals, which are slow)
    copies = [x + 0.0 for _ in range(rounds + 1)]
    mx.eval(x, *copies)
    out.append(("gelu", "12.6 M values", {
        "node": lambda: prim.gelu(x, gelu_fast),
        # a temporary input (as gelu(fc1(x)) in FastViTHD) is donated to the output, no allocation;
        # "x*1 alone" is the cost of making that temporary, to subtract
        "node (temporary in)": lambda: prim.gelu(x * 1.0, gelu_fast),
        "x*1 alone": lambda: x * 1.0,
        "ctypes": lambda: _ctypes_gelu(copies.pop()),
        "twin": lambda: gelu_fast(x),
    }))
    for shape, k in (((1, 64, 64, 384), 7), ((1, 128, 128, 192), 3), ((1, 64, 64, 1536), 5)):
        if quick and k != 7:
            continue
        xi = mx.random.normal(shape)
        w = mx.random.normal((shape[-1], k, k, 1)) * 0.1
        b = mx.random.normal((shape[-1],))
        mx.eval(xi, w, b)
        out.append(("depthwise", f"{k}x{k} {shape[1]}^2x{shape[-1]}", {
            "node": lambda xi=xi, w=w, b=b, k=k: prim.depthwise_conv2d(xi, w, b, 1, k // 2),
            "ctypes": lambda xi=xi, w=w, b=b, k=k: _ctypes_depthwise(xi, w, b, 1, k // 2),
            "twin": lambda xi=xi, w=w, b=b, k=k: dw.depthwise_conv2d_twin(xi, w, b, 1, k // 2),
        }))
    rows = [(896, 896), (4864, 896)] + ([] if quick else [(151649, 896)])
    for n, k in rows:
        for bits in (4, 8):
            w = mx.random.normal((n, k)) * 0.02
            q, s, bb = mx.quantize(w, group_size=64, bits=bits)
            xv = mx.random.normal((1, k))
            mx.eval(q, s, bb, xv)
            del w
            args = (xv, q, s, bb, bits, 64)
            out.append(("gemv", f"{n}x{k} {bits}-bit, 1 row", {
                "node": lambda args=args: prim.quantized_gemv(*args),
                "ctypes": lambda args=args: qgemv.quantized_gemv(*args),
                "twin": lambda args=args: mx.quantized_matmul(args[0], *args[1:4], transpose=True, group_size=64,
                                                              bits=args[4]),
            }))
    for m, k, n in ((512, 1152, 2880), (512, 2880, 1152)):
        a = mx.random.normal((m, k))
        w = mx.random.normal((n, k)) * 0.03  # a Linear weight; the product is a @ w.T
        mx.eval(a, w)
        out.append(("bf16 gemm", f"{m}x{k}x{n}", {
            "node": lambda a=a, w=w: prim.bf16_matmul(a, w.T),
            "ctypes": lambda a=a, w=w: _ctypes_bf16(a, w.T),
            "twin": lambda a=a, w=w: prim.bf16_matmul_reference(a, w.T),
            "fp32": lambda a=a, w=w: a @ w.T,
        }))
    tiny = mx.random.normal((8,))
    ta, tb = mx.random.normal((8, 8)), mx.random.normal((8, 8))
    mx.eval(tiny, ta, tb)
    out.append(("overhead", "gelu, 8 values", {
        "node": lambda: prim.gelu(tiny, gelu_fast),
        "ctypes": lambda: _ctypes_gelu(tiny),
        "twin": lambda: gelu_fast(tiny),
    }))
    out.append(("overhead", "bf16 gemm 8x8x8", {
        "node": lambda: prim.bf16_matmul(ta, tb),
        "ctypes": lambda: _ctypes_bf16(ta, tb),
        "twin": lambda: prim.bf16_matmul_reference(ta, tb),
    }))
    return out


def measure(thunks: dict, rounds: int) -> dict:
    names = list(thunks)
    for name in names:  # warm-up: compiled twins, caches, the pool's threads
        mx.eval(thunks[name]())
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            mx.eval(thunks[name]())
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not prim.enabled():
        raise SystemExit(f"graph nodes unavailable: {prim.unavailable_reason()}")
    bf16.min_product(0)  # the ctypes hook takes the tiny product too
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = []
    for group, name, thunks in cases(args.quick, args.rounds):
        times = measure(thunks, args.rounds)
        medians = {k: statistics.median(v) for k, v in times.items()}
        node = times["node"]
        # node / ctypes within each round (the two ran back to back): robust to a neighbour's load
        paired = statistics.median(n / c for n, c in zip(node, times["ctypes"]))
        row = "  ".join(f"{k} {v:8.3f}" for k, v in medians.items())
        print(f"{group:9s} {name:26s} {row}   (node {min(node):.3f}-{max(node):.3f}; node/ctypes {paired:.2f})",
              flush=True)
        results.append({"group": group, "case": name, "median_ms": medians, "node_over_ctypes": paired,
                        "all_ms": times})
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
