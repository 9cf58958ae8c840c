"""Time the custom kernels against their twins and the unfused MLX ops, at Mobile-O sizes.

    python -m benchmarks.kernels [--quick] [--filter NAME] [--dtype float16] [--json out.json]

Columns (milliseconds, best of the repeats, after a warm-up):

* ``kernel``   the Metal kernel (kernels/metal.py) - Metal only;
* ``twin``     what runs when the kernel does not: ``MOBILEO_MLX_KERNELS=twin``
               (CPU: shift-and-add in four-tap kernels; GPU: ``mx.conv2d`` + the epilogue as MLX ops);
* ``shift``    the shift-and-add on this backend;
* ``unfused``  ``mx.conv2d`` / ``mx.conv1d`` + bias (+ split, SiLU, multiply) as separate ops;
               for linear attention the plain-MLX graph (matmuls in fp32), which is also its twin.

``err`` is the kernel's (or, without Metal, the twin's) max|err| / max|ref| against the unfused
reference in float32. On a CPU-only machine the kernel column is empty: the speed-up of the
Metal kernels can only be measured on a Mac.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import measure, report

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by benchmarks.measure)

from mobileo_mlx import backends, platform
from mobileo_mlx.backends.cpu import layers as cpu_layers
from mobileo_mlx.kernels import depthwise as dw
from mobileo_mlx.models import common

# (name, x shape NHWC (or NLC for conv1d), channel multiplier, k, stride, bias, glu)
CONV_CASES = [
    ("mcp conv1d k3 (CFG batch, 77 tok)", (2, 77, 512), 1, 3, 1, False, False),
    ("sana GLUMBConv dw3x3+glu 16x16x5760", (2, 16, 16, 5760), 1, 3, 1, True, True),
    ("fastvit ConvFFN dw7x7 256x256x96", (1, 256, 256, 96), 1, 7, 1, False, False),
    ("fastvit ConvFFN dw7x7 64x64x384", (1, 64, 64, 384), 1, 7, 1, False, False),
    ("fastvit ConvFFN dw7x7 16x16x1536", (1, 16, 16, 1536), 1, 7, 1, False, False),
    ("fastvit RepMixer dw3x3+b 256x256x96", (1, 256, 256, 96), 1, 3, 1, True, False),
    ("fastvit down 7x7 s2 x2 256x256x96", (1, 256, 256, 96), 2, 7, 2, True, False),
    ("fastvit down 7x7 s2 x2 32x32x768", (1, 32, 32, 768), 2, 7, 2, True, False),
    ("fastvit stem dw3x3 s2 512x512x96", (1, 512, 512, 96), 1, 3, 2, True, False),
    ("fastvit conv_exp 3x3 x2 16x16x1536", (1, 16, 16, 1536), 2, 3, 1, True, False),
    ("dcae LiteMLA dw5x5 16x16x3072", (1, 16, 16, 3072), 1, 5, 1, False, False),
    ("dcae LiteMLA dw5x5 64x64x1536", (1, 64, 64, 1536), 1, 5, 1, False, False),
    ("dcae GLUMBConv dw3x3+glu 16x16x8192", (1, 16, 16, 8192), 1, 3, 1, True, True),
    ("dcae GLUMBConv dw3x3+glu 64x64x4096", (1, 64, 64, 4096), 1, 3, 1, True, True),
]
# (name, B, heads, N, d)
LA_CASES = [
    ("sana linear attn (CFG) 36h x 256", 2, 36, 256, 32),
    ("dcae LiteMLA 16x16, 64h", 1, 64, 256, 32),
    ("dcae LiteMLA 32x32, 64h", 1, 64, 1024, 32),
    ("dcae LiteMLA 64x64, 32h", 1, 32, 4096, 32),
]
QUICK = {"mcp conv1d k3 (CFG batch, 77 tok)", "sana GLUMBConv dw3x3+glu 16x16x5760",
         "fastvit ConvFFN dw7x7 64x64x384", "fastvit down 7x7 s2 x2 32x32x768",
         "dcae LiteMLA dw5x5 16x16x3072", "sana linear attn (CFG) 36h x 256", "dcae LiteMLA 32x32, 64h"}


def _time(fn, args, repeats: int, budget_s: float) -> float:
    mx.eval(fn(*args))  # warm-up: compile, caches
    return measure.best_seconds(lambda: mx.eval(fn(*args)), repeats, budget_s) * 1e3


def _rel_err(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def _conv_impls(mult, k, stride, bias, glu, conv1d):
    pad = k // 2

    def unfused(x, w, *b):
        if conv1d:
            y = mx.conv1d(x, w, padding=pad, groups=x.shape[-1])
            return y + b[0] if b else y
        y = dw.reference(x, w, b[0] if b else None, stride, pad)
        return dw.glu(y) if glu else y

    def shift(x, w, *b):
        x4, w4 = (x[:, None], w[:, None]) if conv1d else (x, w)
        padding = (0, pad) if conv1d else (pad, pad)
        y = dw.shift_add(x4, w4, b[0] if b else None, stride, padding)
        return y[:, 0] if conv1d else (dw.glu(y) if glu else y)

    def public(x, w, *b):  # what the models run (the backend's form, by MOBILEO_MLX_KERNELS)
        if glu and platform.backend() == "metal" and backends.kernels_mode() == "auto":
            return dw.metal_glu(x, w, b[0])
        if glu and platform.backend() == "cpu":
            return cpu_layers.gated_depthwise(x, w, b[0])  # the CPU form: SiLU first, two pieces
        module = common.DepthwiseConv(w.shape[0], w.shape[0], k, stride, pad, bool(b), 1 if conv1d else 2)
        module.weight = w
        if b:
            module.bias = b[0]
        y = backends.accelerate(module, "vision")(x)
        return dw.glu(y) if glu else y

    return unfused, shift, public


def _with_mode(mode, fn):
    def run(*args):
        import os

        old = os.environ.get(backends.KERNELS_ENV)
        os.environ[backends.KERNELS_ENV] = mode
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop(backends.KERNELS_ENV, None)
            else:
                os.environ[backends.KERNELS_ENV] = old

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few representative cases")
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="activation dtype (default: the backend's compute dtype)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per measurement before stopping early")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    backend = platform.backend()
    on_metal = backend == "metal"
    dtype = getattr(mx, args.dtype) if args.dtype else platform.compute_dtype()
    print(f"backend {backend} ({platform.device_name()}), dtype {dtype}, MLX {mx.__version__}")
    if not on_metal:
        print("no Metal here: the kernel column stays empty; the twin column is what this backend runs.")
    twin_name = "shift-and-add" if backend == "cpu" else "mx.conv2d + ops"
    print(f"twin on this backend: {twin_name}\n")
    header = f"{'case':40s} {'kernel':>9s} {'twin':>9s} {'shift':>9s} {'unfused':>9s} {'speed-up':>9s} {'err':>8s}"
    print(header)
    print("-" * len(header))
    rows = []

    def selected(name):
        return (not args.quick or name in QUICK) and args.filter.lower() in name.lower()

    key = mx.random.key(0)
    for name, shape, mult, k, stride, bias, glu in CONV_CASES:
        if not selected(name):
            continue
        conv1d = len(shape) == 3
        C = shape[-1]
        kx, kw, kb = mx.random.split(key, 3)
        x = mx.random.normal(shape, key=kx).astype(dtype)
        w = (mx.random.normal((C * mult, k, 1), key=kw) if conv1d
             else mx.random.normal((C * mult, k, k, 1), key=kw) * 0.2).astype(dtype)
        b = [mx.random.normal((C * mult,), key=kb).astype(dtype)] if bias else []
        unfused, shift, public = _conv_impls(mult, k, stride, bias, glu, conv1d)
        res = _measure(name, (x, w, *b), unfused, shift, public, on_metal, args)
        rows.append(res)
        _print_row(res)
    for name, B, H, N, d in LA_CASES:
        if not selected(name):
            continue
        kq, kk, kv = mx.random.split(key, 3)
        q, kk_, v = (mx.random.normal((B, H, N, d), key=s).astype(dtype) for s in (kq, kk, kv))
        plain = lambda q, k, v: common.relu_linear_attention(q, k, v, 1e-15)  # noqa: E731
        fast = lambda q, k, v: backends.accelerate(common.ReLULinearAttention(1e-15), "dit")(q, k, v)  # noqa: E731
        res = _measure(name, (q, kk_, v), plain, None, fast, on_metal, args)
        rows.append(res)
        _print_row(res)
    report.write_json(args.json, dict(backend=backend, device=platform.device_name(), dtype=str(dtype),
                                      mlx=mx.__version__, rows=rows))
    return 0


def _measure(name, inputs, unfused, shift, public, on_metal, args):
    t_unfused = _time(unfused, inputs, args.repeats, args.budget)
    t_shift = _time(shift, inputs, args.repeats, args.budget) if shift else None
    twin = _with_mode("twin", public)
    t_twin = _time(twin, inputs, args.repeats, args.budget)
    ref = unfused(*[a.astype(mx.float32) for a in inputs])
    t_kernel = None
    if on_metal:
        kern = _with_mode("auto", public)
        t_kernel = _time(kern, inputs, args.repeats, args.budget)
        err = _rel_err(kern(*inputs), ref)
        speedup = t_unfused / t_kernel
    else:
        err = _rel_err(twin(*inputs), ref)
        # linear attention has no separate twin: off Metal it *is* the unfused graph
        speedup = t_unfused / t_twin if shift is not None else None
    return dict(case=name, kernel_ms=t_kernel, twin_ms=t_twin, shift_ms=t_shift, unfused_ms=t_unfused,
                speedup_vs_unfused=speedup, err=err)


def _print_row(r):
    def f(v):
        return f"{v:9.2f}" if v is not None else f"{'-':>9s}"

    print(f"{r['case'][:40]:40s} {f(r['kernel_ms'])} {f(r['twin_ms'])} {f(r['shift_ms'])} {f(r['unfused_ms'])} "
          f"{_x(r['speedup_vs_unfused'])} {r['err']:8.1e}", flush=True)


def _x(v):
    return f"{v:8.2f}x" if v is not None else f"{'-':>9s}"


if __name__ == "__main__":
    sys.exit(main())
