"""The backend seam: everything that makes a backend fast, in one place per backend.

The models (``mobileo_mlx.models``) are plain MLX networks with the reference's structure.
:func:`accelerate` applies a backend to a loaded component in one call, as quantization
does: it swaps modules for faster forms of the same computation (subclasses of the plain
modules, sharing their parameters), chosen by a table per backend and component:

* ``backends.cpu``: MLX's CPU backend (fast float32 activations and attention, the native
  kernels as graph nodes, two-stream splits, the DC-AE's convs as window GEMMs, quantized
  layers that dequantize on the fly, bfloat16 products);
* ``backends.metal``: the Metal kernels (depthwise convs, GLUMBConv's gated conv, linear
  attention);
* CUDA: MLX's own operations, the plain models.

``MOBILEO_MLX_KERNELS`` (:func:`kernels_mode`, the one place that reads it) says how much of
this runs: ``auto`` everything, ``twin`` the backend's forms with the plain-MLX twin of every
custom kernel (no Metal kernels, no native C), ``reference`` nothing (the plain models).
Every threshold lives in ``backends.tuning``.
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx
import mlx.nn as nn

from mobileo_mlx import platform
from mobileo_mlx.backends import tuning

KERNELS_ENV = "MOBILEO_MLX_KERNELS"
KERNELS_MODES = ("auto", "twin", "reference")
MATMUL_ENV = "MOBILEO_MLX_CPU_MATMUL"
MATMUL_CHOICES = ("auto", "fp32", "bf16")


def kernels_mode() -> str:
    """``$MOBILEO_MLX_KERNELS``: ``auto`` (default), ``twin`` or ``reference`` (see above)."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if value not in KERNELS_MODES:
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected one of {', '.join(KERNELS_MODES)}")
    return value


def swap(model: nn.Module, table: dict) -> nn.Module:
    """Replace every module of ``model`` (``model`` included) whose type *is* a key of ``table``
    (exactly: a subclass is left alone) by an instance of the value, a subclass sharing its
    parameters, children and attributes; its ``prepare()``, if any, runs once, after its own
    children were swapped. Returns the model (a new object only when ``model`` itself was
    swapped). Swapping twice with the same table changes nothing."""

    def convert(value):
        if isinstance(value, nn.Module):
            form = table.get(type(value))
            if form is not None:
                fast = form.__new__(form)
                dict.update(fast, value)  # parameters and children: the same arrays and modules
                fast.__dict__.update(value.__dict__)  # plain attributes (sizes, training mode)
                value = fast
            for key, child in list(value.items()):
                converted = convert(child)
                if converted is not child:
                    dict.__setitem__(value, key, converted)
            if form is not None and hasattr(value, "prepare"):
                value.prepare()
            return value
        if isinstance(value, list):
            for index, item in enumerate(value):
                value[index] = convert(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                value[key] = convert(item)
        return value

    return convert(model)


def accelerate(model: nn.Module, component: str, *, matmul: str = "fp32") -> nn.Module:
    """``model`` (the loaded ``component``, a key of ``models.MODELS``) with the current backend's
    forms swapped in (nothing under ``MOBILEO_MLX_KERNELS=reference``). ``matmul``: ``"bf16"``
    gives its matrix products bfloat16 operands (float32 sums) on the CPU (see
    :func:`resolve_cpu_matmul`). Idempotent."""
    if matmul not in ("fp32", "bf16"):
        raise ValueError(f"matmul must be 'fp32' or 'bf16', not {matmul!r}")
    if kernels_mode() == "reference":
        return model
    backend = platform.backend()
    if backend == "cpu":
        from mobileo_mlx.backends import cpu

        return swap(model, cpu.table(component, matmul))
    if backend == "metal":
        from mobileo_mlx.backends import metal

        return swap(model, metal.TABLE)
    return model


@contextlib.contextmanager
def session(keep_heap: bool = True):
    """One call of the pipeline that runs several stages in a row (a picture: conditioning, denoising,
    decode). On the CPU, with ``keep_heap``, the memory a stage frees stays in the process's heap for
    the next one and is given back when the call ends, not at each stage's end, after which the next
    stage would page-fault its working set in again. A no-op elsewhere."""
    if platform.backend() != "cpu" or not keep_heap:
        yield
        return
    from mobileo_mlx.backends.cpu import memory

    with memory.heap_kept():
        yield


def bf16_unavailable_reason() -> str | None:
    """None when bfloat16 CPU products can run here, else why not (one line)."""
    from mobileo_mlx.kernels import primitives

    reason = primitives.unavailable_reason()
    if reason is not None:
        return f"the native kernels are {reason}" if reason.startswith(("not", "built")) else reason
    if not primitives.bf16_supported():
        return "this CPU has no AVX512-BF16"
    return None


def resolve_cpu_matmul(choice: str | None = None) -> str:
    """``fp32`` or ``bf16`` for a choice of auto / fp32 / bf16 (default: ``$MOBILEO_MLX_CPU_MATMUL``,
    else auto = bf16 where it can run). Asking for bf16 where it cannot run is a ValueError."""
    value = (choice or os.environ.get(MATMUL_ENV, "") or "auto").strip().lower()
    if value not in MATMUL_CHOICES:
        raise ValueError(f"CPU matmul precision {value!r}: expected one of {', '.join(MATMUL_CHOICES)}")
    reason = bf16_unavailable_reason()
    if value == "auto":
        return "bf16" if reason is None else "fp32"
    if value == "bf16" and reason is not None:
        raise ValueError(f"bf16 CPU matmuls are not available: {reason}")
    return value


@contextlib.contextmanager
def stage(limit: int | None = None, keep_heap: bool = True, encoding: bool = False):
    """One pipeline stage on the CPU: MLX's buffer-cache limit raised to ``limit`` (default
    ``tuning.STAGE_CACHE_BYTES``; never lowered, so 0 leaves it), with ``keep_heap`` freed
    memory kept in the process's heap (``backends.cpu.memory``) and with ``encoding`` the
    language model's products in bfloat16 where its component was accelerated with
    ``matmul="bf16"`` (a prompt encoded for a picture: no token is chosen); then restored, with
    what the stage cached and the bf16 GEMM's packing buffers freed. A no-op on GPUs (their
    cache is already large)."""
    if platform.backend() != "cpu":
        yield
        return
    from mobileo_mlx.backends.cpu import layers, memory
    from mobileo_mlx.kernels import primitives

    limit = tuning.STAGE_CACHE_BYTES if limit is None else limit
    with (memory.heap_kept() if keep_heap else contextlib.nullcontext(),  # left last: it trims what is free
          layers.encoding(encoding)):
        previous = mx.set_cache_limit(limit)  # returns the limit it replaces
        if previous >= limit:
            mx.set_cache_limit(previous)
        try:
            yield
        finally:
            mx.set_cache_limit(previous)
            mx.clear_cache()
            if primitives.available():
                primitives.extension().bf16_release()


__all__ = ["KERNELS_ENV", "KERNELS_MODES", "MATMUL_CHOICES", "MATMUL_ENV", "accelerate", "bf16_unavailable_reason",
           "kernels_mode", "resolve_cpu_matmul", "session", "stage", "swap"]
