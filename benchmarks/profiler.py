"""Where the time goes inside a model: exclusive time per module call and per model function.

``OpProfiler`` wraps every module class of a model tree and the functions of the model's Python
modules; ``profile_table`` prints what it collected. Evaluating every call on its own disables
MLX's lazy fusion, so a profiled total is always shown beside the plain one.
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from collections import defaultdict

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)
import mlx.core as mx

from benchmarks.report import fmt, table

# Python modules whose functions are wrapped (beside every module class of the profiled tree).
FUNCTION_MODULES = ("mobileo_mlx.models.sana", "mobileo_mlx.models.dcae", "mobileo_mlx.backends.cpu.activations",
                    "mobileo_mlx.backends.cpu.layers", "mobileo_mlx.kernels.depthwise")


class OpProfiler:
    """Exclusive time per module call and per function of the model code.

    Every module class in the model tree and every function of ``FUNCTION_MODULES`` is wrapped: a wrapped
    call evaluates its inputs first (work charged to its caller), then runs and evaluates its
    output under the clock. Each entry is charged its time minus the time of the wrapped calls
    inside it, so a block's own row is the glue it computes inline (norms, residuals, reshapes).
    Evaluating every call separately disables MLX's lazy fusion: the profiled total is shown
    beside the plain one."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.paths: dict[int, str] = {}
        self._children: list[float] = []
        self._modules: list[str] = []  # enclosing module paths, innermost last
        self._restore: list = []

    def name_modules(self, model, prefix: str) -> None:
        for path, module in model.named_modules():
            name = f"{prefix}.{path}" if path else prefix
            name = re.sub(r"(?<!up_)blocks\.\d+\.", "blocks.*.", name)  # DiT blocks: one row per layer kind
            name = re.sub(r"(?<!up_)blocks\.\d+$", "blocks.*", name)
            name = re.sub(r"up_blocks\.(\d+)\.\d+", r"up_blocks.\1.*", name)  # VAE: one row per stage
            name = re.sub(r"network\.(\d+)\.\d+", r"network.\1.*", name)  # FastViT: one row per stage
            self.paths[id(module)] = f"{name} [{type(module).__name__}]"

    def _wrap(self, fn, label_of, is_module: bool):
        profiler = self

        def wrapper(*args, **kwargs):
            pending = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (mx.array, tuple, list))]
            mx.eval(pending)
            label = label_of(args)
            if not is_module and profiler._modules:  # a function: named after the module calling it
                label = f"{profiler._modules[-1].split(' [')[0]}: {label}"
            profiler._children.append(0.0)
            if is_module:
                profiler._modules.append(label)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                mx.eval(out)
            finally:
                total = time.perf_counter() - start
                inner = profiler._children.pop()
                if is_module:
                    profiler._modules.pop()
                profiler.seconds[label] += total - inner
                profiler.calls[label] += 1
                if profiler._children:
                    profiler._children[-1] += total
            return out

        return wrapper

    def wrap_classes_of(self, model) -> None:
        classes = list(dict.fromkeys(type(module) for _, module in model.named_modules()))
        originals = {cls: cls.__call__ for cls in classes}  # resolved before any class is patched
        for cls in classes:
            self._restore.append((cls, "__call__", cls.__dict__.get("__call__")))
            cls.__call__ = self._wrap(originals[cls],
                                      lambda args: self.paths.get(id(args[0]), f"? [{type(args[0]).__name__}]"), True)

    def wrap_functions_of(self, module) -> None:
        for name, value in list(vars(module).items()):
            if name.startswith("__") or inspect.isclass(value) or inspect.ismodule(value) or not callable(value):
                continue
            if inspect.isfunction(value) and value.__module__ != module.__name__:
                continue  # imported helpers (dataclass, ...) stay as they are
            native = ("nb_func", "function", "builtin_function_or_method")
            if not inspect.isfunction(value) and type(value).__name__ not in native:
                continue
            self.wrap_function(module, name, f"{module.__name__.split('.')[-1]}.{name}()")

    def wrap_function(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self._restore.append((owner, name, original))
        setattr(owner, name, self._wrap(original, lambda args: label, False))

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()


def instrument(profiler: OpProfiler, model) -> None:
    """Wrap ``model``'s module classes, the functions of ``FUNCTION_MODULES`` and MLX's fused attention."""
    profiler.wrap_classes_of(model)
    for name in FUNCTION_MODULES:
        profiler.wrap_functions_of(importlib.import_module(name))
    profiler.wrap_function(mx.fast, "scaled_dot_product_attention", "mx.fast.scaled_dot_product_attention()")


def profile(name: str, run, model, repeats: int) -> dict:
    """``run()`` (which builds ``model``'s output) once to warm up, ``repeats`` times as it runs,
    then once with every call of ``model`` (named from ``name``) evaluated and timed on its own."""
    mx.eval(run())  # warm-up
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(run())
        plain.append(time.perf_counter() - t0)
    profiler = OpProfiler()
    profiler.name_modules(model, name)
    instrument(profiler, model)
    try:
        t0 = time.perf_counter()
        mx.eval(run())
        profiled = time.perf_counter() - t0
    finally:
        profiler.restore()
    return {"plain_s": min(plain), "plain_all_s": plain, "profiled_s": profiled,
            "ops": dict(profiler.seconds), "calls": dict(profiler.calls)}


def profile_table(part: dict, title: str, load: str, top: int = 16) -> str:
    """The ``top`` calls of a ``profile`` result by exclusive time, then the rest and what no
    wrapped call accounts for."""
    rows = sorted(part["ops"].items(), key=lambda kv: -kv[1])
    shown = rows[:top]
    rest = sum(s for _, s in rows[top:])
    unaccounted = part["profiled_s"] - sum(s for _, s in rows)

    def share(seconds):
        return fmt(100 * seconds / part["profiled_s"], 1)

    table_rows = [[op, part["calls"].get(op, ""), fmt(s * 1e3, 0), share(s)] for op, s in shown]
    table_rows.append([f"({len(rows) - len(shown)} more rows)", "", fmt(rest * 1e3, 0), share(rest)])
    table_rows.append(["(outside any wrapped call)", "", fmt(unaccounted * 1e3, 0), share(unaccounted)])
    plain_all = ", ".join(f"{s:.2f}" for s in part.get("plain_all_s", [part["plain_s"]]))
    return "\n".join([
        f"{title}: best {part['plain_s']:.2f} s as run ({plain_all}), {part['profiled_s']:.2f} s with "
        f"every call evaluated separately (exclusive times; {load})",
        table(["call (module path [class] or function)", "calls", "ms", "% of profiled"], table_rows),
    ])
