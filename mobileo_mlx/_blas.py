"""Route MLX's CPU matmuls to an optimized OpenBLAS on Linux.

The ``mlx-cpu`` wheel links a reference BLAS (about 8 GFLOP/s for fp32
matmul on a 2-core x86 box). ``libmlx.so`` imports ``cblas_sgemm``,
``cblas_dgemm`` and ``cblas_cgemm`` dynamically, so a library that exports
those names and is loaded with ``RTLD_GLOBAL`` *before* ``libmlx.so`` wins the
symbol lookup. We load, in order of preference:

1. ``scipy-openblas32`` (a pip dependency on Linux) plus our compiled shim
   ``mobileo_mlx/kernels/native/blas_shim*.so`` (source: ``kernels/native/blas_shim.c``) that forwards the standard names to
   its ``scipy_``-prefixed symbols;
2. a system ``libopenblas`` (it exports the standard names itself).

This module must not import ``mlx``. It runs from ``mobileo_mlx/__init__.py``, which
Python imports before any ``mobileo_mlx.…`` module, so every entry point is covered.
Set ``MOBILEO_MLX_BLAS=reference`` to opt out.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

# Every compiled library of the project lives there (kernels/native in a checkout).
_NATIVE_DIR = Path(__file__).resolve().parent / "kernels" / "native"


@dataclass
class BlasStatus:
    routed: bool
    provider: str  # human-readable: what answers cblas_sgemm
    detail: str = ""


_status: BlasStatus | None = None
_warned = False
_keep_alive: list[ctypes.CDLL] = []  # dlopen handles must outlive the process
_shim: ctypes.CDLL | None = None  # our shim, when it answers MLX's cblas_sgemm


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_global(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _keep_alive.append(lib)
    return lib


def _shim_path() -> str | None:
    candidates = sorted(glob.glob(str(_NATIVE_DIR / "blas_shim*.so")))
    return candidates[0] if candidates else None


def _try_scipy_openblas() -> BlasStatus | None:
    try:
        import scipy_openblas32
    except ImportError:
        return None
    shim = _shim_path()
    if shim is None:
        return None
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    candidates = sorted(lib_dir.glob(f"lib{scipy_openblas32.get_library()}*.so*"))
    if not candidates:
        return None
    _load_global(str(candidates[0]))
    shim_lib = _load_global(shim)
    shim_lib.mobileo_blas_shim_target.restype = ctypes.c_char_p
    global _shim
    _shim = shim_lib
    version = getattr(scipy_openblas32, "__version__", "")
    return BlasStatus(True, f"OpenBLAS (scipy-openblas32 {version})".replace(" )", ")"), shim)


def _try_system_openblas() -> BlasStatus | None:
    name = ctypes.util.find_library("openblas")
    if not name:
        return None
    try:
        lib = _load_global(name)
        lib.cblas_sgemm  # noqa: B018 - raises AttributeError when absent
    except (OSError, AttributeError):
        return None
    return BlasStatus(True, f"OpenBLAS (system {name})", name)


# OpenBLAS's worker threads spin (sched_yield) for 2**28 cycles, ~0.1 s, after every threaded
# call before they sleep, holding the second core right after each matmul. MLX runs its
# element-wise work on one thread per CPU stream, and we put independent halves of it on a
# second stream (backends/cpu/streams.py); with spinning BLAS threads that stream gets no core
# (a CFG DiT step: 8.2 s of CPU for 4.1 s of wall time). 2**4 cycles makes them sleep at once:
# measured the same GEMM speed, and the second stream's work really runs in parallel.
# OpenBLAS reads the variable once, when it loads; the user's own setting wins.
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT = "4"


@contextlib.contextmanager
def _idle_threads_sleep():
    """OPENBLAS_THREAD_TIMEOUT set (unless the user set it) while OpenBLAS loads, and
    restored afterwards, so that child processes (a PyTorch reference, say) see the
    environment unchanged."""
    global thread_timeout_at_load
    if THREAD_TIMEOUT_ENV in os.environ:
        thread_timeout_at_load = f"{os.environ[THREAD_TIMEOUT_ENV]} (set by the user)"
        yield
        return
    os.environ[THREAD_TIMEOUT_ENV] = THREAD_TIMEOUT
    thread_timeout_at_load = f"{THREAD_TIMEOUT} (idle threads sleep at once)"
    try:
        yield
    finally:
        os.environ.pop(THREAD_TIMEOUT_ENV, None)


thread_timeout_at_load: str | None = None  # what OpenBLAS read, for `mobileo-mlx doctor`


def route_blas() -> BlasStatus:
    """Make MLX's BLAS calls resolve to OpenBLAS; idempotent, never raises."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus(False, "platform default (Accelerate on macOS)")
        return _status
    if os.environ.get("MOBILEO_MLX_BLAS", "").lower() == "reference":
        _status = BlasStatus(False, "reference BLAS (MOBILEO_MLX_BLAS=reference)")
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(False, "reference BLAS (mlx.core was imported first)")
        _warn_once(
            "mlx.core was imported before mobileo_mlx, so MLX keeps the slow reference "
            "BLAS of the mlx-cpu wheel (~8 GFLOP/s). Import mobileo_mlx before mlx, "
            "or run through the `mobileo-mlx` command."
        )
        return _status
    try:
        with _idle_threads_sleep():
            _status = _try_scipy_openblas() or _try_system_openblas()
    except OSError as error:  # a broken library file; fall through to the warning
        _status = None
        detail = str(error)
    else:
        detail = ""
    if _status is None:
        _status = BlasStatus(False, "reference BLAS (no OpenBLAS found)", detail)
        _warn_once(
            "No OpenBLAS could be loaded, so MLX uses the slow reference BLAS of the "
            "mlx-cpu wheel (~8 GFLOP/s). Reinstall with `pip install -e .` (it builds "
            "the BLAS shim and brings scipy-openblas32) or install a system "
            "libopenblas (e.g. `apt-get install libopenblas0`)."
            + (f" ({detail})" if detail else "")
        )
    return _status


def status() -> BlasStatus:
    return route_blas()


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_symbol_library(symbol: str = "cblas_sgemm") -> str | None:
    """The file that answers ``symbol`` in the process's global scope, which is
    searched before libmlx.so's own dependencies; None when no global library
    exports it (then MLX binds to the reference BLAS it ships with)."""
    if not sys.platform.startswith("linux"):
        return None
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()
