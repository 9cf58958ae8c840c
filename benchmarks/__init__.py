"""Benchmarks (never part of the test suite): `python -m benchmarks.<name>`."""
