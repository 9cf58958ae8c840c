"""mslemu: run MLX ``mx.fast.metal_kernel`` bodies on the CPU (Linux CI, no Mac).

``mslemu.metal_kernel`` has ``mx.fast.metal_kernel``'s constructor and call; the
kernel source is generated exactly as MLX generates it and compiled with g++
against a small MSL shim (``include/``). See kernels/README.md for what it checks
and what only a Mac can show.
"""

from .driver import (  # noqa: F401
    ATTRIBUTES,
    SCHEDULES,
    Generated,
    InputMeta,
    Kernel,
    MslemuError,
    Settings,
    cache_dir,
    check_schedules,
    compile_unit,
    current_settings,
    generate_source,
    kernel_name,
    lint,
    metal_kernel,
    record,
    settings,
)
