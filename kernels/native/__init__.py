"""C sources of the CPU kernels (built by setup.py into shared libraries beside them, loaded with ctypes)."""
