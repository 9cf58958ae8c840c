"""Freed memory kept in the process's heap while a pipeline stage runs (Linux, glibc).

MLX's CPU allocator takes its buffers from ``malloc``, and glibc maps every allocation above its
mmap threshold (128 KB, adjusted up to 32 MB as it goes) afresh and unmaps it when it is freed.
A stage allocates and frees the same large temporaries over and over (each DiT step, each band of
the DC-AE), so every one of them is page-faulted in anew (about half a million page faults a VAE
decode). Inside a stage (``backends.stage``) the thresholds are raised, so those buffers come from
the heap and freed ones are reused; when the outermost stage ends, glibc's own steady-state
thresholds return and ``malloc_trim`` gives what is free back to the system. A user's own
``MALLOC_*`` or ``GLIBC_TUNABLES`` settings win: then nothing is changed. Measured in
benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading

from mobileo_mlx.backends import tuning

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
# After a stage: glibc's own thresholds once it has freed a large mapping (its dynamic threshold, which
# any mallopt switches off, rises to at most 32 MB and the trim threshold to twice that).
_AFTER_MMAP_THRESHOLD, _AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc's mallopt / malloc_trim, or None (another libc, another system, or the user's settings)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have neither
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def available() -> bool:
    """Whether stages keep freed memory in the heap here."""
    return _libc() is not None


@contextlib.contextmanager
def heap_kept():
    """Inside: allocations below ``tuning.HEAP_MMAP_THRESHOLD`` come from the heap and freed memory
    stays there (up to ``tuning.HEAP_TRIM_THRESHOLD``). Nested uses share the outermost one."""
    global _depth
    libc = _libc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, tuning.HEAP_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, tuning.HEAP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)
