"""One request's work as the scheduler sees it, and the events it sends back.

A :class:`Job` is shared by two sides: the request handler (on the server's event loop)
creates it, submits it and reads its events; the worker thread does its work and posts the
events. The handler cancels it when its client goes away; the worker notices between two
units of work (a token, a denoising step) and drops it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image


class QueueFull(Exception):
    """The server holds as many requests as ``--max-queue`` allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


# --- events (worker -> handler) --------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    """More of a chat answer, in order."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """The chat answer is complete; its last text was sent as a TextDelta before this."""

    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ImagesDone:
    images: list  # encoded image files (bytes), one per requested image
    seeds: list  # the seed of each


@dataclass(frozen=True)
class Failed:
    """The job ended without a result: ``error`` says why (an InputError is the client's)."""

    error: BaseException


@dataclass(frozen=True)
class Cancelled:
    """The job was dropped (its client went away, or the server is stopping)."""

    reason: str


# --- jobs --------------------------------------------------------------------------------


class Job:
    """What every job has: an id, a cancellation flag and the channel its events go through."""

    kind = "job"

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self._cancelled = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._events: Optional[asyncio.Queue] = None
        self.ended = threading.Event()  # set by the scheduler once, with the last event
        self.cancel_reason = ""

    # handler side

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver this job's events to ``loop`` (call before submitting it)."""
        self._loop = loop
        self._events = asyncio.Queue()

    async def next_event(self):
        return await self._events.get()

    def cancel(self, reason: str = "the client went away") -> None:
        """Ask the worker to drop this job at its next unit of work (safe from any thread)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # worker side

    def post(self, event) -> None:
        """Hand ``event`` to the handler's loop; dropped when nobody listens any more."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


@dataclass
class Sampling:
    """A chat request's decoding options, checked (``options.check_sampling`` and the server's own)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: tuple = ()


class ChatJob(Job):
    """A chat answer: the prompt (pictures decoded, ids counted), then decoding in the batch."""

    kind = "chat"

    def __init__(self, prompt, pictures: list[Image.Image], prompt_ids: list[int], prompt_tokens: int,
                 sampling: Sampling) -> None:
        super().__init__()
        self.prompt = prompt  # a processing.Prompt
        self.pictures = list(pictures)
        self.prompt_ids = prompt_ids  # -200 at each picture slot
        self.last_token = prompt_ids[-1]  # the template's last token: text, never a picture slot
        self.prompt_tokens = prompt_tokens  # text + features of every picture
        self.sampling = sampling
        # the worker's state
        self.embeddings = None  # [1, L, D] until prefilled
        self.cache = None  # the prompt's KV cache (all but the last position)
        self.prefilled = 0
        self.generated = 0

    @property
    def length_bound(self) -> int:
        """The most positions this answer can take in the batch's KV cache."""
        return self.prompt_tokens + self.sampling.max_tokens

    @property
    def needs_vision(self) -> bool:
        return bool(self.pictures) and self.embeddings is None


@dataclass
class ImageSpec:
    """An image request's options, checked."""

    prompt: object  # a processing.Prompt: the generation or edit template around the user's text
    count: int
    size: int
    steps: int
    guidance: float
    seeds: list
    scheduler: str = "dpm"
    output_format: str = "png"
    source: Optional[Image.Image] = None  # the picture to edit
    extra: dict = field(default_factory=dict)


class ImageJob(Job):
    """Text to image or an edit: conditioning, denoising step by step, decoding."""

    kind = "image"

    def __init__(self, spec: ImageSpec) -> None:
        super().__init__()
        self.spec = spec
        self.conditioned = False
        self.result: Optional[ImagesDone] = None

    @property
    def needs_vision(self) -> bool:
        return self.spec.source is not None and not self.conditioned
