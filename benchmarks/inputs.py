"""What every side of every benchmark is fed, identical on each side.

* a full-size random checkpoint in the released layout (``<cache>/bench/checkpoint-full``, written
  once by ``mobileo_mlx.convert.demo``) and its conversion per quantization recipe
  (``<cache>/bench/mlx-<recipe>``, once each, by ``python -m convert.from_torch``); both carry a
  stamp of what wrote them, so a change of the writer or of the converted format rewrites them;
* the prompt, the question, the seeded NCHW noise and the seeded 1024x1024 picture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import REPO, log
from mobileo_mlx import platform
from mobileo_mlx.convert import demo

RECIPES = ("none", "8", "4", "mixed")
GROUP_SIZE = 64
CHECKPOINT_SEED = 0

PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
QUESTION = "Describe this picture in detail."
NOISE_SEED = 42
PICTURE_SEED = 7


def bench_dir() -> Path:
    return platform.cache_dir() / "bench"


def out_dir(name: str) -> Path:
    """Where a benchmark's workers leave their pictures and arrays."""
    return bench_dir() / "out" / name


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def full_checkpoint(rebuild: bool = False) -> Path:
    """The full-size random checkpoint (bf16, released layout), written once (3.3 GB)."""
    target = bench_dir() / "checkpoint-full"
    stamp = {"writer_version": demo.WRITER_VERSION, "dims": "full", "seed": CHECKPOINT_SEED, "dtype": "bfloat16"}
    if not rebuild and _read_json(target / "bench-stamp.json") == stamp:
        return target
    log(f"writing the full-size random checkpoint into {target} (once, ~3.3 GB)")
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    demo.write_checkpoint(staging, "full", seed=CHECKPOINT_SEED, dtype="bfloat16")
    (staging / "bench-stamp.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    log(f"  written in {time.perf_counter() - started:.0f} s")
    return target


def converted(recipe: str, rebuild: bool = False) -> Path:
    """The checkpoint converted with ``recipe`` (``python -m convert.from_torch``, once)."""
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    from mobileo_mlx.weights import FORMAT_VERSION

    source = full_checkpoint()
    target = bench_dir() / f"mlx-{recipe}"
    # Beside the folder, not in it: the converter's --force replaces only a folder of its own files.
    stamp_file = bench_dir() / f"mlx-{recipe}.stamp.json"
    stamp = {"checkpoint": _read_json(source / "bench-stamp.json"), "recipe": recipe, "group_size": GROUP_SIZE,
             "format_version": FORMAT_VERSION}
    if not rebuild and _read_json(stamp_file) == stamp and (target / "config.json").is_file():
        return target
    log(f"converting the checkpoint with --quantize {recipe} into {target} (once)")
    stamp_file.unlink(missing_ok=True)
    (target / "bench-stamp.json").unlink(missing_ok=True)  # where earlier versions of this harness kept it
    started = time.perf_counter()
    command = [sys.executable, "-m", "convert.from_torch", str(source), "--output", str(target),
               "--quantize", recipe, "--group-size", str(GROUP_SIZE), "--force", "--quiet"]
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"conversion failed ({' '.join(command)})")
    stamp_file.write_text(json.dumps(stamp))
    log(f"  converted in {time.perf_counter() - started:.0f} s")
    return target


def model_config(folder: Path) -> dict:
    """The converted folder's ``config.json`` (one section per component)."""
    return json.loads((Path(folder) / "config.json").read_text())


def latent_cells(vae: dict, size: int) -> int:
    """Side of the latent grid of a ``size``^2 picture (the DC-AE halves it once per stage after the first)."""
    return size // 2 ** (len(vae["block_out_channels"]) - 1)


def noise(vae: dict, size: int = 512, seed: int = NOISE_SEED) -> np.ndarray:
    """The initial latent of a ``size``^2 picture, NCHW float32 (the reference layout), from the
    ``vae`` section of a converted config (or the same two fields of diffusers' config)."""
    cells = latent_cells(vae, size)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, int(vae["latent_channels"]), cells, cells)).astype(np.float32)


def picture(size: int = 1024, seed: int = PICTURE_SEED):
    """A seeded synthetic photo-like RGB picture (smooth gradients + noise), PIL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(5 * x * y + 2)], -1) * 90 + 128
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
