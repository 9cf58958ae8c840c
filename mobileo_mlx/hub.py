"""Resolving ``--model``: ``"demo"``, a converted folder, an original checkpoint
folder or a hub id -> a converted folder.

Original checkpoints (local or downloaded) are converted once into the cache
(``~/.cache/mobileo-mlx``, or ``$MOBILEO_MLX_CACHE``), keyed by the source
(path and file sizes/times, or repo id and revision) and the quantization
recipe, and reused afterwards.

The cache heals: a cached conversion that fails :func:`weights.check_folder`
(a truncated or corrupt file, a missing one, a broken config.json) is converted
again from its source, and what killed runs left (temporary folders whose
process is gone) is removed. A converted folder outside the cache that fails the
check gets an error with the command that converts it again.

Hub downloads (only what conversion needs) are the converter's:
:mod:`mobileo_mlx.convert.download`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mobileo_mlx.convert.download import download_checkpoint
from mobileo_mlx.convert.layout import looks_like_hub_id
from mobileo_mlx.errors import ConversionError, HubError, InputError, WeightsError

from . import platform
from .weights import COMPONENTS, FORMAT_VERSION, check_folder, is_converted_folder

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
    """Convert ``source`` into the cache once; later calls return the cached folder, or
    convert again when it fails :func:`weights.check_folder`."""
    from mobileo_mlx.convert.checkpoint import Checkpoint
    from mobileo_mlx.convert.from_torch import convert_checkpoint

    source_key = f"{source_key}|{Checkpoint(source).fingerprint()}"
    target = cache_folder(label, source_key, quantize, group_size)
    _remove_stale_conversions(target.parent)
    if target.exists():
        try:
            check_folder(target)
            return target
        except WeightsError as problem:
            print(f"the cached conversion of {label} is broken ({problem}); converting it again", file=sys.stderr)
    elif progress:
        print(f"converting {label} into {target} (once; --quantize {quantize})", file=sys.stderr)
    try:
        return convert_checkpoint(
            source, target, quantize=quantize, group_size=group_size, force=True, progress=progress,
            source_label=label, cache_entry=True,
        )
    except ConversionError:
        try:  # another process finished first
            check_folder(target)
            return target
        except WeightsError:
            pass
        raise


def _remove_stale_conversions(converted: Path) -> list[str]:
    """The converter's temporaries (``.NAME.partial-PID``, ``.NAME.old-PID``) left by killed runs."""
    return platform.remove_stale_temporaries(converted)


def reconvert_command(folder: Path) -> str:
    """The command that converts ``folder`` again, from the source and recipe its config.json
    records (``CHECKPOINT`` where it records none)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    config = config if isinstance(config, dict) else {}
    source = config.get("source") if isinstance(config.get("source"), dict) else {}
    label, path = source.get("checkpoint"), source.get("path")
    if isinstance(label, str) and looks_like_hub_id(label) and not Path(label).exists():
        checkpoint = label
    elif isinstance(path, str) and Path(path).exists():
        checkpoint = path
    elif isinstance(label, str) and label and Path(label).exists():
        checkpoint = label
    else:
        checkpoint = "CHECKPOINT"
    words = ["mobileo-mlx", "convert", checkpoint, "--output", str(folder)]
    quantization = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    recipe, group_size = quantization.get("recipe"), quantization.get("group_size")
    if isinstance(recipe, str):
        words += ["--quantize", recipe]
    if isinstance(group_size, int) and recipe != "none":
        words += ["--group-size", str(group_size)]
    words.append("--force")
    return " ".join(word if word == "CHECKPOINT" else shlex.quote(word) for word in words)


def _looks_converted(folder: Path) -> bool:
    """A folder with the converter's component files but no usable format mark."""
    return folder.is_dir() and any((folder / f"{c}.safetensors").is_file() for c in COMPONENTS)


def resolve_model(
    spec: str | os.PathLike,
    *,
    quantize: str | None = None,
    group_size: int | None = None,
    progress: bool = True,
) -> Path:
    """A converted folder for ``spec``: ``"demo"``, a converted folder (checked, returned
    as is), an original checkpoint folder or a hub id (converted once into the cache)."""
    from mobileo_mlx.convert.quantize import DEFAULT_GROUP_SIZE, DEFAULT_RECIPE

    quantize = quantize or DEFAULT_RECIPE
    group_size = group_size or DEFAULT_GROUP_SIZE
    text = str(spec)
    if not text.strip():
        raise InputError(
            f"--model is empty: name 'demo', a folder or a hub id (owner/name), or leave it out for {DEFAULT_MODEL}"
        )
    if text == DEMO:
        from .demo import demo_checkpoint_path

        platform.cache_dir(create=True)
        return convert_into_cache(demo_checkpoint_path(), "demo", "demo", quantize, group_size, progress)
    path = Path(text).expanduser()
    if path.exists():
        if is_converted_folder(path):
            try:
                check_folder(path)
            except WeightsError as problem:
                raise WeightsError(f"{problem}; convert it again: {reconvert_command(path)}") from None
            return path
        if _looks_converted(path) and not any(path.glob("*model*.safetensors")):
            raise WeightsError(
                f"{path} holds converted weights but no readable config.json with \"format\": \"mobileo-mlx\"; "
                f"convert the checkpoint again into a new folder: mobileo-mlx convert CHECKPOINT --output NEW_FOLDER"
            )
        platform.cache_dir(create=True)
        return convert_into_cache(path, path.resolve().name, str(path.resolve()), quantize, group_size, progress)
    if looks_like_hub_id(text):
        platform.cache_dir(create=True)
        folder = download_checkpoint(text, progress=progress)
        return convert_into_cache(folder, text, f"hub:{text}", quantize, group_size, progress)
    raise HubError(f"model not found: {text!r} is not 'demo', an existing folder or a hub id (owner/name)")


# ---------------------------------------------------------------------------
# what `mobileo-mlx doctor` says about the cache


@dataclass
class CacheReport:
    """The cache's converted models: those that pass the check, those that fail it (name,
    problem; converted again on next use) and the stale temporaries removed."""

    models: list[str] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problem: str | None = None  # the cache folder itself is unusable


def scan_cache(root: Path | None = None) -> CacheReport:
    """Check every converted model in the cache and remove stale temporaries (what killed
    conversions and demo-checkpoint writes left)."""
    root = platform.cache_dir() if root is None else root
    report = CacheReport()
    if root.exists() and not root.is_dir():
        report.problem = f"{root} is a file, not a folder"
        return report
    from .demo import CHECKPOINT_FOLDER

    converted = root / CONVERTED_SUBFOLDER
    report.removed += platform.remove_stale_temporaries(root, CHECKPOINT_FOLDER)
    report.removed += [f"{CONVERTED_SUBFOLDER}/{name}" for name in _remove_stale_conversions(converted)]
    try:
        # Cache entries never start with a dot; the converter's temporaries (live ones included) do.
        folders = sorted(p for p in converted.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        folders = []
    for folder in folders:
        name = f"{CONVERTED_SUBFOLDER}/{folder.name}"
        try:
            check_folder(folder)
            report.models.append(name)
        except WeightsError as problem:
            report.broken.append((name, str(problem)))
    return report
