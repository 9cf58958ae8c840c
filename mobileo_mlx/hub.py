"""Resolving ``--model``: ``"demo"``, a converted folder, an original checkpoint
folder or a hub id -> a converted folder.

Original checkpoints (local or downloaded) are converted once into the cache
(``~/.cache/mobileo-mlx``, or ``$MOBILEO_MLX_CACHE``), keyed by the source
(path and file sizes/times, or repo id and revision) and the quantization
recipe, and reused afterwards.

Hub downloads (only what conversion needs) are the converter's:
:mod:`mobileo_mlx.convert.download`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from mobileo_mlx.convert.download import download_checkpoint
from mobileo_mlx.convert.layout import looks_like_hub_id
from mobileo_mlx.errors import ConversionError, HubError

from . import platform
from .weights import FORMAT_VERSION, is_converted_folder

DEFAULT_MODEL = "Amshaker/Mobile-O-0.5B"
DEMO = "demo"
CONVERTED_SUBFOLDER = "converted"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def cache_folder(label: str, source_key: str, quantize: str, group_size: int) -> Path:
    """Where the conversion of one source with one recipe lives in the cache."""
    key = f"{source_key}|{quantize}|{group_size}|format{FORMAT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return platform.cache_dir() / CONVERTED_SUBFOLDER / f"{_slug(label)}-{quantize}-{digest}"


def convert_into_cache(
    source: Path, label: str, source_key: str, quantize: str, group_size: int, progress: bool = True
) -> Path:
    """Convert ``source`` into the cache once; later calls return the cached folder."""
    from mobileo_mlx.convert.checkpoint import Checkpoint
    from mobileo_mlx.convert.from_torch import convert_checkpoint

    source_key = f"{source_key}|{Checkpoint(source).fingerprint()}"
    target = cache_folder(label, source_key, quantize, group_size)
    if is_converted_folder(target):
        return target
    if progress:
        print(f"converting {label} into {target} (once; --quantize {quantize})", file=sys.stderr)
    try:
        return convert_checkpoint(
            source, target, quantize=quantize, group_size=group_size, force=target.exists(), progress=progress,
            source_label=label,
        )
    except ConversionError:
        if is_converted_folder(target):  # another process finished first
            return target
        raise


def resolve_model(
    spec: str | os.PathLike,
    *,
    quantize: str | None = None,
    group_size: int | None = None,
    progress: bool = True,
) -> Path:
    """A converted folder for ``spec``: ``"demo"``, a converted folder (returned
    as is), an original checkpoint folder or a hub id (converted once into the
    cache)."""
    from mobileo_mlx.convert.quantize import DEFAULT_GROUP_SIZE, DEFAULT_RECIPE

    quantize = quantize or DEFAULT_RECIPE
    group_size = group_size or DEFAULT_GROUP_SIZE
    text = str(spec)
    if text == DEMO:
        from .demo import demo_checkpoint_path

        return convert_into_cache(demo_checkpoint_path(), "demo", "demo", quantize, group_size, progress)
    path = Path(text).expanduser()
    if path.exists():
        if is_converted_folder(path):
            return path
        return convert_into_cache(path, path.resolve().name, str(path.resolve()), quantize, group_size, progress)
    if looks_like_hub_id(text):
        folder = download_checkpoint(text, progress=progress)
        return convert_into_cache(folder, text, f"hub:{text}", quantize, group_size, progress)
    raise HubError(f"model not found: {text!r} is not 'demo', an existing folder or a hub id (owner/name)")
