"""Compiled helpers (the Linux BLAS shim); loaded with ctypes, never imported."""
