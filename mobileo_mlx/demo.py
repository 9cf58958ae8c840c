"""The demo checkpoint in the cache: what ``--model demo`` converts.

The checkpoint itself (random values in the released layout) is the converter's fixture,
:mod:`mobileo_mlx.convert.demo`; this module keeps one copy of it in the cache, written on first
use and complete or absent whatever happens to the process writing it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mobileo_mlx.convert import demo as fixture

DEMO_STAMP = "demo.json"  # beside the checkpoint files: which writer made them
CHECKPOINT_FOLDER = "demo-checkpoint"  # in the cache


def demo_checkpoint_path() -> Path:
    """The demo checkpoint in the cache (``<cache>/demo-checkpoint``), written on first use and
    rewritten when the fixture's ``WRITER_VERSION`` changes or its files are damaged.

    It is written into ``demo-checkpoint.tmp-PID`` and renamed into place, so the folder is
    complete or absent; what a killed writer left is removed by the next call."""
    from .platform import cache_dir, remove_stale_temporaries

    root = cache_dir(create=True)
    target = root / CHECKPOINT_FOLDER
    stamp = {"writer_version": fixture.WRITER_VERSION, "dims": "demo", "seed": 0}
    remove_stale_temporaries(root, name=target.name)
    if _read_stamp(target) == stamp and _intact(target):
        return target
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fixture.write_checkpoint(staging, "demo", seed=0)
        # The stamp last: a folder with the stamp is complete.
        (staging / DEMO_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if target.exists():
            if _read_stamp(target) == stamp and _intact(target):  # another process finished first
                return target
            # Out of the way in one step: never a half-deleted checkpoint under the name.
            retired = target.with_name(f"{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process got there first
            if _read_stamp(target) != stamp or not _intact(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _intact(folder: Path) -> bool:
    """The checkpoint's config and weights are there and the weights' header is sound (cheap:
    no tensor data is read)."""
    from .errors import WeightsError
    from .weights import safetensors_entries

    if not (folder / "config.json").is_file():
        return False
    try:
        safetensors_entries(folder / "model.safetensors")
    except WeightsError:
        return False
    return True


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / DEMO_STAMP).read_text())
    except (OSError, ValueError):
        return None
