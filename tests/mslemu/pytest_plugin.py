"""Run any test with the project's Metal kernels emulated on the CPU:

    .venv/bin/python -m pytest -p tests.mslemu.pytest_plugin tests/test_dcae.py

For the whole session every test sees the Metal backend (``platform.backend()`` patched, before
any model fixture is built), so ``backends.accelerate`` swaps in the Metal forms, and the
kernels are built with ``mslemu.metal_kernel``; so model parity tests check the kernels in
place of the twins. Prints how many kernel launches each test made.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _mslemu_metal_backend():
    from tests import mslemu
    from mobileo_mlx import backends, platform
    from mobileo_mlx.kernels import metal

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(platform, "backend", lambda: "metal")
        patch.setattr(metal, "_metal", metal.MetalKernels(mslemu.metal_kernel))
        patch.delenv(backends.KERNELS_ENV, raising=False)
        yield


@pytest.fixture(autouse=True)
def _mslemu_launches(request, _mslemu_metal_backend):
    from tests import mslemu

    with mslemu.record() as calls:
        yield
    kinds = sorted({c["kernel"].split("__")[0].removeprefix("custom_kernel_") for c in calls})
    if calls:
        print(f"\n[mslemu] {request.node.name}: {len(calls)} emulated kernel launches {kinds}")
