"""Downloading an original Mobile-O checkpoint from the Hugging Face hub.

Only what conversion needs is fetched, from either released layout (the repo root or
``final_merged_model_23620/``): config, tokenizer files, diffusers configs if present, and
the weights of one layout. Downloads go through ``huggingface_hub.snapshot_download``
(resumable, with progress bars, into the Hugging Face cache). Offline, whatever a previous
download left in that cache is used.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from mobileo_mlx.convert.layout import DIFFUSION_CONFIG_FILES, MERGED_SUBFOLDER, TOKENIZER_FILES
from mobileo_mlx.errors import HubError

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


def hub_config_files(repo_id: str, wanted: Iterable[str]) -> dict[str, Path]:
    """The wanted diffusers config files of ``repo_id``: from the local hub
    cache, else downloaded (json files only). Missing ones are left out."""
    from huggingface_hub import hf_hub_download

    found: dict[str, Path] = {}
    reachable: bool | None = None
    for section in wanted:
        subfolder, filename = DIFFUSION_CONFIG_FILES[section]
        try:
            found[section] = Path(
                hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=True)
            )
            continue
        except Exception:
            pass
        if reachable is None:
            reachable = hub_reachable()
        if not reachable:
            continue
        try:
            found[section] = Path(hf_hub_download(repo_id, filename, subfolder=subfolder))
        except Exception:
            continue
    return found
