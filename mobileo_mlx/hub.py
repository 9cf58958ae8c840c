"""Resolving ``--model``: ``"demo"``, a converted folder, an original checkpoint
folder or a hub id -> a converted folder.

Original checkpoints (local or downloaded) are converted once into the cache
(``~/.cache/mobileo-mlx``, or ``$MOBILEO_MLX_CACHE``), keyed by the source
(path and file sizes/times, or repo id and revision) and the quantization
recipe, and reused afterwards.

Hub downloads fetch only what conversion needs, from either released layout
(the repo root or ``final_merged_model_23620/``): config, tokenizer files,
diffusers configs if present, and the weights of one layout. They go through
``huggingface_hub.snapshot_download`` (resumable, with progress bars, into the
Hugging Face cache).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from convert.checkpoint import MERGED_SUBFOLDER, TOKENIZER_FILES, ConversionError, looks_like_hub_id

from . import platform
from .weights import FORMAT_VERSION, is_converted_folder

DEMO = "demo"
CONVERTED_SUBFOLDER = "converted"

_SMALL_FILES = (
    "config.json",
    *TOKENIZER_FILES,
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)
_LAYOUTS = ("", MERGED_SUBFOLDER + "/")
_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
_TORCH = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")


class HubError(ConversionError):
    """The hub could not provide a model (one line, names what to fetch)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails at
    once instead of sitting through huggingface_hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def download_patterns(repo_files: list[str] | None) -> list[str]:
    """``allow_patterns`` for snapshot_download: the small files of both layouts
    plus the weights of one layout (the root when it has weights, as the
    released repo does; ``.bin`` only where there are no safetensors)."""
    patterns = [prefix + name for prefix in _LAYOUTS for name in _SMALL_FILES]
    if repo_files is None:
        weights = [prefix + p for prefix in _LAYOUTS for p in ("model*.safetensors", "model.safetensors.index.json")]
        return patterns + weights
    for kind in (_SAFETENSORS, _TORCH):
        for prefix in _LAYOUTS:
            chosen = [
                f for f in repo_files if f.startswith(prefix) and kind.fullmatch(f[len(prefix):])
            ]
            if chosen:
                return patterns + sorted(chosen)
    raise HubError(
        "the repo holds no Mobile-O weights (model.safetensors or pytorch_model.bin, "
        f"at its root or in {MERGED_SUBFOLDER}/)"
    )


def _needed_files_hint(repo_id: str) -> str:
    return (
        f"fetch config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json, "
        f"special_tokens_map.json and added_tokens.json from https://huggingface.co/{repo_id} "
        f"(repo root or {MERGED_SUBFOLDER}/) into a folder and pass that folder"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _has_weights(folder: Path) -> bool:
    for prefix in ("", MERGED_SUBFOLDER):
        base = folder / prefix
        if base.is_dir() and any(
            _SAFETENSORS.fullmatch(p.name) or _TORCH.fullmatch(p.name) for p in base.iterdir()
        ):
            return True
    return False


def download_checkpoint(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """Download what conversion needs from ``repo_id``; returns the local snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if hub_reachable():
        try:
            repo_files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception as error:
            raise HubError(f"cannot list {repo_id} on the hub: {_first_line(error)}") from None
        patterns = download_patterns(repo_files)
        silence = not progress and not are_progress_bars_disabled()
        if silence:
            disable_progress_bars()
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as error:
            raise HubError(
                f"download of {repo_id} failed ({_first_line(error)}); run again to resume, or {_needed_files_hint(repo_id)}"
            ) from None
        finally:
            if silence:
                enable_progress_bars()
        return Path(folder)
    # Offline: whatever a previous download left in the local cache.
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=download_patterns(None), local_files_only=True)
        )
    except Exception:
        folder = None
    if folder is None or not _has_weights(folder):
        raise HubError(f"cannot reach the hub to download {repo_id} (offline?): {_needed_files_hint(repo_id)}")
    return folder


# ---------------------------------------------------------------------------
# cache


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
    from convert.checkpoint import Checkpoint
    from convert.from_torch import convert_checkpoint

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
    from convert.quantize import DEFAULT_GROUP_SIZE, DEFAULT_RECIPE

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
