"""The server's settings (``mobileo-mlx serve``'s options) and its limits.

Why these limits (the option bounds of :mod:`mobileo_mlx.options` hold too):

* request bodies: 25 MiB by default (``--max-body-mb``), checked before the body is read
  when it declares its length and while it is read when it does not; a base64 picture of
  that size is already far more than the vision tower's 1024x1024 needs.
* pictures: 16 megapixels each (4096x4096, 48 MB decoded), read from the header before the
  picture is decoded; larger ones are refused. Each is scaled down to the vision tower's
  size as soon as it is decoded, and at most two are decoded at a time, so pictures cost a
  bounded amount of memory whatever the load. At most 8 pictures a request.
* images per request: 1 to 10 (OpenAI's bound for ``n``); each is denoised in turn.
* queue: ``--max-queue`` requests held at once (decoding, denoising or waiting); one more
  gets a 503 at once, so a burst cannot pile up unbounded work or memory.
* decoding batch: ``--max-batch`` answers decode together (8 by default: the CPU kernel of
  the quantized products reads each weight once for up to 8 rows), and their KV cache,
  padded to the longest, holds at most ``--max-batch-tokens`` positions (16384 by default:
  384 MB at full size, 24 KB a position).
* ``max_tokens``: ``--max-tokens`` (512) when a request does not say; at most 4096 as for
  ``chat``, and the prompt at most 4096 tokens (text and 256 a picture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

API_KEY_ENV = "MOBILEO_MLX_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_MB = 25
MAX_PICTURE_PIXELS = 4096 * 4096
MAX_PICTURES = 8
MAX_IMAGES = 10
DECODING_PICTURES = 2  # pictures decoded at once
REMOTE_TIMEOUT_S = 10.0


@dataclass
class Settings:
    model_id: str  # the id /v1/models lists and requests name
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: Optional[str] = None
    max_queue: int = 16
    max_batch: int = 8
    max_batch_tokens: int = 16384
    default_max_tokens: int = 512
    max_body_bytes: int = MAX_BODY_MB << 20
    allow_remote_images: bool = False
    shutdown_timeout: float = 30.0
    keep_loaded: bool = False
    log_level: str = "info"

    @staticmethod
    def api_key_from_environment() -> Optional[str]:
        return os.environ.get(API_KEY_ENV) or None
