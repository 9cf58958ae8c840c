"""Backend detection and the facts `mobileo-mlx doctor` prints.

``backend()`` says where MLX computes; ``mobileo_mlx.backends`` makes each one fast. Import this module through the package so the BLAS routing in
``mobileo_mlx/__init__.py`` runs before ``mlx.core`` loads.
"""

from __future__ import annotations

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


def matmul_gflops(n: int = 1024, repeats: int = 5, product=None) -> float:
    """Best-of-``repeats`` ``n``x``n``x``n`` float32 matmul throughput in GFLOP/s (``product(a, b)``:
    how to multiply, default ``a @ b``)."""
    product = product or (lambda a, b: a @ b)
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(product(a, b))  # warm-up: thread pools, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(product(a, b))
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
