"""Measuring, and the parent/worker protocol.

* clocks: ``best_seconds`` (best of a few calls that finish their own work);
* memory: MLX's peak, the process's peak and current RSS (CUDA's peak is in ``torch_side``);
* the machine: MLX backend and device, CPU, cores, load average, the achieved matmul and copy rates;
* workers: each side runs in its own process (``python -m benchmarks.X --worker SIDE ...``) so its
  peak RSS is its own, and answers with one JSON line on stdout (``emit``); the parent starts it
  and reads that line (``run_worker``). Progress goes to stderr (``log``).

Import order matters: ``mobileo_mlx`` (BLAS routing) before ``mlx.core``.
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)
import mlx.core as mx

from mobileo_mlx import platform

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load n/a"


# ----------------------------------------------------------------------------------------------
# clocks


def best_seconds(run: Callable[[], object], repeats: int, budget_s: float = math.inf) -> float:
    """The shortest of ``repeats`` calls of ``run``, which must finish its work before returning
    (``mx.eval``, a device synchronisation); stops early once ``budget_s`` has passed and two
    calls have run. Warm up before: the first call is timed too."""
    best = math.inf
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


# ----------------------------------------------------------------------------------------------
# memory


def peak_rss_gb() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def rss_gb() -> float:
    """Current RSS (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return peak_rss_gb()


def mlx_peak_gb() -> float:
    return mx.get_peak_memory() / 2**30


def mlx_reset_peak() -> None:
    mx.reset_peak_memory()


# ----------------------------------------------------------------------------------------------
# the machine


def machine() -> dict:
    """What ran the numbers: MLX backend/device, CPU, cores, load."""
    return {
        "backend": platform.backend(),
        "device": platform.device_name(),
        "cpu": _platform.processor() or _platform.machine(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "load": load_average(),
    }


def mlx_matmul_gflops(dtype=None, n: int = 1024, product=None) -> float:
    """Best-of-5 n^3 matmul GFLOP/s on the MLX default device in ``dtype`` (the compute dtype),
    by ``product(a, b)`` (default ``a @ b``)."""
    dtype = dtype or platform.compute_dtype()
    product = product or (lambda a, b: a @ b)
    a = mx.random.normal((n, n), key=mx.random.key(0)).astype(dtype)
    b = mx.random.normal((n, n), key=mx.random.key(1)).astype(dtype)
    mx.eval(a, b, product(a, b))
    return 2 * n**3 / best_seconds(lambda: mx.eval(product(a, b)), 5) / 1e9


def mlx_picture_matmul_gflops(model) -> float:
    """The rate of the products the picture stages run: the bf16 GEMM node where the model takes
    bfloat16 CPU products (``model.cpu_matmul``), else MLX's own matmul."""
    if model.cpu_matmul == "bf16" and platform.backend() == "cpu":
        from mobileo_mlx.kernels import primitives

        return mlx_matmul_gflops(product=primitives.bf16_matmul)
    return mlx_matmul_gflops()


def mlx_copy_gbps(mib: int = 256) -> float:
    """Best-of-3 copy bandwidth (read + write) on the MLX default device, GB/s."""
    x = mx.zeros((mib * 2**20 // 4,), dtype=mx.float32)
    mx.eval(x)
    return 2 * x.nbytes / best_seconds(lambda: mx.eval(x + 1), 3) / 1e9


class Loading:
    """Loads a MobileO's components when a worker's flow needs them (as the CLI does), timing the loading
    apart from the stages: ``loading(*names)``, then ``loading.seconds`` in all."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __call__(self, *names: str) -> float:
        """Loads ``names``; returns the seconds it took."""
        started = time.perf_counter()
        for name in names:
            self.model.component(name)
        took = time.perf_counter() - started
        self.seconds += took
        return took


def mlx_side(model) -> dict:
    """How a ``MobileO`` computes: the facts every MLX worker reports."""
    bf16 = model.cpu_matmul == "bf16" and platform.backend() == "cpu"
    return {"side": "mlx", "dtype": str(model.dtype).split(".")[-1] + (", bf16 CPU matmuls" if bf16 else ""),
            "device": platform.device_name(), "backend": platform.backend()}


# ----------------------------------------------------------------------------------------------
# workers (one process per side)


def set_threads(threads: int | None) -> None:
    """Pin the CPU thread count of every side (OpenBLAS under MLX, OpenMP / intra-op under torch);
    the workers inherit the environment. ``None`` leaves the libraries' defaults."""
    if threads:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)


def run_worker(module: str, side: str, args: list[str], timeout: float | None = None) -> dict:
    """``python -m <module> --worker <side> <args>``; its last stdout line is a JSON object."""
    command = [sys.executable, "-m", module, "--worker", side, *args]
    log(f"[{side}] {' '.join(command[1:])}  ({load_average()})")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"[{side}] worker failed with exit code {result.returncode}")
    data = json.loads(lines[-1])
    data.setdefault("wall_s", time.perf_counter() - started)
    log(f"[{side}] done in {time.perf_counter() - started:.0f} s  ({load_average()})")
    return data


def emit(result: dict) -> None:
    """A worker's answer: one JSON line on stdout."""
    print(json.dumps(result), flush=True)
