"""Backend detection and the facts `mobileo-mlx doctor` prints.

Code picks its path by backend at run time (``backend()``); nothing assumes
Metal. Import this module through the package so the BLAS routing in
``mobileo_mlx/__init__.py`` runs before ``mlx.core`` loads.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
import shutil
import time
from pathlib import Path

import mlx.core as mx

from . import _blas
from .errors import InputError

CACHE_ENV = "MOBILEO_MLX_CACHE"


def backend() -> str:
    """``"metal"``, ``"cuda"`` or ``"cpu"``: where MLX's default device computes."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def compute_dtype() -> mx.Dtype:
    """The activation dtype that is fastest *and* accurate on this backend.

    On CPU, half-precision matmuls are naive loops (~40x slower than fp32
    sgemm), so the CPU computes in float32; GPUs use float16.
    """
    return mx.float32 if backend() == "cpu" else mx.float16


def device_name() -> str:
    try:
        info = mx.device_info()
    except Exception:  # older MLX or backend without the call
        return str(mx.default_device())
    return str(info.get("device_name") or info.get("architecture") or mx.default_device())


def cache_dir(create: bool = False) -> Path:
    """Where converted models live: ``$MOBILEO_MLX_CACHE`` or ``~/.cache/mobileo-mlx``.

    With ``create`` the folder is made if needed and must be a writable folder: anything
    else raises :class:`InputError` (one line naming the place and the variable)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "mobileo-mlx"
    if not create:
        return path
    fix = f"set {CACHE_ENV} to a writable folder" if root else f"fix it or set {CACHE_ENV} to a writable folder"
    if path.exists() and not path.is_dir():
        raise InputError(f"the cache folder {path} is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the cache folder {path} ({error.strerror or error}): {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"the cache folder {path} is not writable: {fix}")
    return path


# Folders of unfinished writes, named after what they become and the writer's process id:
# ``demo-checkpoint.tmp-PID`` (the demo checkpoint), ``.NAME.partial-PID`` and
# ``.NAME.old-PID`` (the converter's staging folder and the output it replaces).
TEMPORARY_NAME = re.compile(r"^(?P<name>.+)\.(?:tmp|partial|old)-(?P<pid>\d+)$")
# A temporary untouched this long is stale even if its process id is alive: process ids are
# reused, and another machine's process (a shared cache) cannot be seen from here. A
# conversion writes into its folder every few seconds.
STALE_AFTER_S = 6 * 3600


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, subfolders, files in os.walk(path):
            for name in subfolders + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except OSError:  # removed meanwhile
                    pass
    return newest


def is_stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary folder (:data:`TEMPORARY_NAME`) left by a writer that
    was killed: its process is gone, or it has not been touched for :data:`STALE_AFTER_S`."""
    match = TEMPORARY_NAME.match(path.name)
    if match is None:
        return False
    pid = int(match["pid"])
    try:
        if pid != os.getpid() and not process_alive(pid):
            return True
        return time.time() - _newest_mtime(path) > STALE_AFTER_S
    except OSError:  # gone already
        return False


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[str]:
    """Remove the stale temporary folders directly in ``folder`` (only those that become
    ``name``, when given); returns their names."""
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # no folder, nothing to remove
        return removed
    for path in entries:
        match = TEMPORARY_NAME.match(path.name)
        if match is None or (name is not None and match["name"] != name) or not is_stale_temporary(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path.name)
    return removed


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``n``x``n``x``n`` matmul throughput in GFLOP/s."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up: thread pools, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def memory_limit_bytes() -> int:
    try:
        return int(mx.get_memory_limit())
    except Exception:
        return 0


def blas_provider() -> str:
    if backend() != "cpu":
        return f"not used for matmuls on {backend()}"
    status = _blas.status()
    answering = _blas.global_symbol_library("cblas_sgemm")
    if answering is None:
        return status.provider
    return f"{status.provider}; cblas_sgemm -> {Path(answering).name}"


@functools.lru_cache(maxsize=None)
def cpu_helper_stream() -> mx.Stream:
    """A second CPU stream (created once). MLX runs each CPU stream on its own thread, and
    everything but BLAS on that one thread: independent halves of a large single-threaded op
    (a quantized_matmul, an element-wise activation) put on this stream run in parallel."""
    return mx.new_stream(mx.cpu)


# True inside a piece of work that cpu_pieces placed on one stream: the element-wise helpers
# must not split it again across the streams (the other stream is busy with the other piece).
_PINNED = contextvars.ContextVar("mobileo_mlx_pinned_stream", default=False)


def may_split_over_streams() -> bool:
    """Whether a large single-threaded CPU op may split itself over the two CPU streams."""
    return mx.default_device() == mx.cpu and not _PINNED.get()


def cpu_pieces(count: int, build) -> list:
    """``[build(0), ..., build(count - 1)]``, piece i built on CPU stream i % 2 (the default
    stream, then :func:`cpu_helper_stream`): MLX runs each CPU stream on its own thread, and
    all of its work outside BLAS on that thread, so independent pieces of element-wise work
    (the two images of a CFG batch, two channel halves) run on both cores. ``build`` must
    create *everything* of its piece, the slicing of its inputs included: an op created
    outside would run on the default stream and make the helper wait for it. The caller
    joins the pieces (one join, at the end: a consumer of the helper's output placed earlier
    makes the default stream wait there and serialises the two).

    Needs OpenBLAS's idle threads to sleep rather than spin (``_blas`` sets
    ``OPENBLAS_THREAD_TIMEOUT``): a spinning BLAS thread holds the second core after every
    matmul. Elsewhere than the CPU, or nested, the pieces are built in order on the
    current stream."""
    if not may_split_over_streams():
        return [build(i) for i in range(count)]
    streams = (mx.default_stream(mx.cpu), cpu_helper_stream())
    pieces = []
    for i in range(count):
        token = _PINNED.set(True)
        try:
            with mx.stream(streams[i % 2]):
                pieces.append(build(i))
        finally:
            _PINNED.reset(token)
    return pieces


# MLX's CPU buffer cache keeps 32 MB of freed buffers; past that every temporary is fresh
# memory, page-faulted (zeroed by the kernel) on first touch. The LLM prefill and the
# denoising loop reuse the same few temporaries over and over: with 256 MB cached a CFG DiT
# step takes 4.2 s instead of 4.5 s and the LLM + MCP 0.9 s instead of 1.5 s, for +0.25 GB RSS.
STAGE_CACHE_BYTES = 256 << 20


@contextlib.contextmanager
def stage_buffer_cache(limit: int = STAGE_CACHE_BYTES):
    """Raise MLX's buffer-cache limit to ``limit`` on the CPU for one stage, then restore it
    and free what the stage cached. A no-op on GPUs (their cache is already large)."""
    if backend() != "cpu":
        yield
        return
    previous = mx.set_cache_limit(limit)  # returns the limit it replaces
    if previous >= limit:
        mx.set_cache_limit(previous)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()

