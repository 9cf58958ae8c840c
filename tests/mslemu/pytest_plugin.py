"""Run any test with the project's Metal kernels emulated on the CPU:

    .venv/bin/python -m pytest -p tests.mslemu.pytest_plugin tests/test_dcae.py

Every test then sees the Metal backend for kernel dispatch (``kernels._dispatch``) and
the kernels are built with ``mslemu.metal_kernel``; so model parity tests check the
kernels in place of the twins. Prints how many kernel launches each test made.
"""

from __future__ import annotations

import pytest

_shared = None


@pytest.fixture(autouse=True)
def _mslemu_metal_dispatch(monkeypatch, request):
    global _shared
    from tests import mslemu
    from mobileo_mlx.kernels import _dispatch, metal

    if _shared is None:
        _shared = metal.MetalKernels(mslemu.metal_kernel)
    monkeypatch.setattr(_dispatch.platform, "backend", lambda: "metal")
    monkeypatch.setattr(metal, "_metal", _shared)
    monkeypatch.delenv(_dispatch.ENV, raising=False)
    with mslemu.record() as calls:
        yield
    kinds = sorted({c["kernel"].split("__")[0].removeprefix("custom_kernel_") for c in calls})
    if calls:
        print(f"\n[mslemu] {request.node.name}: {len(calls)} emulated kernel launches {kinds}")
