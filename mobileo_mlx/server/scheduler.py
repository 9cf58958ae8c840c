"""The one worker thread that owns all MLX work, and the bounded queue in front of it.

Request handlers :meth:`Scheduler.submit` jobs; at most ``max_queue`` are held at once
(waiting or at work), and one more is refused at once (:class:`QueueFull`, a 503) rather than
queued without bound. The worker loops over three kinds of units, one of each per turn:

1. a unit of the image job at the head of the image line: its conditioning, one denoising
   step, or one decode (image jobs run one at a time, in order);
2. then, for as long as that unit took (at least once), chat: the chats waiting for the batch
   join it, in order, while it has room (those of text only at once; one with pictures takes
   a unit: its embeddings, the vision tower running for its pictures, or a chunk of its
   prefill), and the batch takes a decoding step (every answer in flight gains a token; the
   prompts that just joined are prefilled together first).

So chat never waits for a whole image, only for one of its units, and when both have work
each gets about half of the worker's time. Between two turns the worker drops the jobs whose clients went away
(:meth:`Job.cancel`): cancellation takes effect at the next token or denoising step.

An error in a job's unit fails that job alone (its client gets the error); an error in a
decoding step fails the answers of that batch and starts a fresh one. The worker itself keeps
going: a bad request never leaves the server broken.

Memory between requests (``keep_loaded`` False, the default): the language model and the
MCP stay loaded (chat and every image's conditioning need them); the vision tower is freed
once no waiting request has a picture to encode; the DiT and the decoder are loaded for an
image request and freed when it is done with them (:mod:`.images`). With ``keep_loaded``,
whatever was loaded stays. While it has work, the worker keeps MLX's CPU buffer cache raised
(``backends.stage``): the same temporaries serve step after step; when idle it
gives that cache back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Optional

from .. import backends
from ..errors import MobileOError
from ..processing import IMAGE_TOKEN_SENTINEL
from . import images
from .batching import ChatBatch
from .jobs import Cancelled, ChatJob, Failed, ImageJob, Job, QueueFull, ShuttingDown

log = logging.getLogger("mobileo_mlx.server")

PRELOAD = ("language", "mcp")  # what every kind of request needs, loaded before the first one
VISION = ("vision", "projector")


class Scheduler:
    def __init__(self, model, *, max_queue: int = 16, max_batch: int = 8, max_batch_tokens: int = 16384,
                 prefill_chunk: int = 512, keep_loaded: bool = False) -> None:
        self.model = model
        self.max_queue = max_queue
        self.keep_loaded = keep_loaded
        self._batch_options = dict(max_sequences=max_batch, max_positions=max_batch_tokens,
                                   prefill_chunk=prefill_chunk)
        self._batch: Optional[ChatBatch] = None
        self._lock = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._held = 0  # jobs submitted and not ended
        self._accepting = True
        self._stopping = False
        self.counts = Counter()  # completed, cancelled, failed, refused
        self._prefill_line: deque[ChatJob] = deque()
        self._image_line: deque[ImageJob] = deque()
        self._image_work = None
        self._vision_loaded = False
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None
        self.started = time.time()

    # --- control (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker and wait until it has loaded what every request needs; a loading
        error is raised here."""
        self._thread = threading.Thread(target=self._run, name="mobileo-mlx-worker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self._accepting:
                self.counts["refused"] += 1
                raise ShuttingDown()
            if self._held >= self.max_queue:
                self.counts["refused"] += 1
                raise QueueFull()
            self._held += 1
            self._inbox.append(job)
            self._lock.notify()

    def drain(self) -> None:
        """Take no new jobs (the server is stopping); the ones held go on."""
        with self._lock:
            self._accepting = False

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        with self._lock:
            for job in self._all_jobs():
                job.cancel(reason)
            self._lock.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is left and end the worker (it finishes the unit it is in)."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            for job in self._all_jobs():
                job.cancel("the server is shutting down")
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._lock:
            batch = self._batch
            return {
                "in_flight": self._held,
                "capacity": self.max_queue,
                "decoding": len(batch) if batch is not None else 0,
                "prefilling": len(self._prefill_line),
                "images": len(self._image_line),
                "completed": self.counts["completed"],
                "cancelled": self.counts["cancelled"],
                "failed": self.counts["failed"],
                "refused": self.counts["refused"],
                "decode_steps": batch.steps if batch is not None else 0,
                "decoded_tokens": batch.tokens if batch is not None else 0,
                "accepting": self._accepting,
            }

    def _all_jobs(self) -> list[Job]:
        jobs = [*self._inbox, *self._prefill_line, *self._image_line]
        if self._batch is not None:
            jobs += self._batch.jobs()
        return jobs

    # --- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for name in PRELOAD:
                self.model.component(name)
            self._batch = ChatBatch(self.model, **self._batch_options)
            self._warm_up()
        except BaseException as error:  # reported by start()
            self._startup_error = error
            self._ready.set()
            return
        self._ready.set()
        busy = None  # MLX's raised buffer cache, held while there is work
        try:
            while True:
                with self._lock:
                    while not self._inbox and not self._has_work() and not self._stopping:
                        if busy is not None:  # idle: the cache goes back
                            busy.__exit__(None, None, None)
                            busy = None
                        self._lock.wait()
                    self._take_inbox()
                    stopping = self._stopping
                if stopping:
                    self._drop_all("the server is stopping")
                    return
                if busy is None:
                    busy = backends.stage()
                    busy.__enter__()
                self._drop_cancelled()
                # As much time for chat as the image's unit took (when chat has work): each
                # goes at about half speed while the other has work too.
                share = self._image_unit()
                deadline = time.perf_counter() + share
                while True:
                    self._prefill_unit()
                    self._decode_unit()
                    self._settle_memory()
                    if time.perf_counter() >= deadline or not (self._prefill_line or len(self._batch)):
                        break
                    with self._lock:
                        self._take_inbox()
                        if self._stopping:
                            break
                    self._drop_cancelled()
        finally:
            if busy is not None:
                busy.__exit__(None, None, None)

    def _warm_up(self) -> None:
        """A two-token answer before the first request: MLX compiles its CPU kernels for the
        prefill and the decoding now rather than in a client's time (and while it compiles,
        glibc's system(), which MLX calls to run the compiler, ignores SIGINT)."""
        from .. import processing
        from .jobs import ChatJob, Sampling

        prompt = processing.chat_prompt([processing.Message("user", "Hello")])
        ids = self.model.prompt_ids(prompt)
        job = ChatJob(prompt, [], ids, len(ids), Sampling(max_tokens=2))
        self._batch.insert(job)
        while len(self._batch):
            self._batch.step()
        self._batch.steps = self._batch.tokens = 0

    def _has_work(self) -> bool:
        return bool(self._prefill_line or self._image_line or len(self._batch))

    def _take_inbox(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            (self._image_line if isinstance(job, ImageJob) else self._prefill_line).append(job)

    def _end(self, job: Job, event, outcome: str) -> None:
        """``job`` is over: its slot is free before its client hears it (so the client's next
        request finds room), then its last event."""
        with self._lock:
            self._held -= 1
            self.counts[outcome] += 1
        job.ended.set()
        job.post(event)
        if outcome == "failed" and not isinstance(event.error, MobileOError):
            log.error("request %s failed: %s", job.id, event.error, exc_info=event.error)

    def _drop_all(self, reason: str) -> None:
        for job in self._all_jobs():
            self._end(job, Cancelled(reason), "cancelled")
        self._inbox.clear()
        self._prefill_line.clear()
        self._image_line.clear()
        self._close_image_work()
        self._batch.reset()

    def _drop_cancelled(self) -> None:
        gone = [job for job in self._prefill_line if job.cancelled]
        for job in gone:
            self._prefill_line.remove(job)
            self._end(job, Cancelled(job.cancel_reason), "cancelled")
        decoding = [job for job in self._batch.jobs() if job.cancelled]
        if decoding:
            self._batch.remove(decoding)
            for job in decoding:
                self._end(job, Cancelled(job.cancel_reason), "cancelled")
        for job in [job for job in self._image_line if job.cancelled]:
            if job is self._image_line[0]:
                self._close_image_work()
                self._release("dit", "vae")
            self._image_line.remove(job)
            self._end(job, Cancelled(job.cancel_reason), "cancelled")

    def _image_unit(self) -> float:
        """One unit of the image job at the head of the line: the seconds it took."""
        if not self._image_line:
            return 0.0
        started = time.perf_counter()
        job = self._image_line[0]
        if self._image_work is None:
            self._image_work = images.work(self.model, job, release=not self.keep_loaded)
        try:
            vision = job.needs_vision
            next(self._image_work)
            self._vision_loaded |= vision
        except StopIteration:
            self._image_work = None
            self._image_line.popleft()
            self._end(job, job.result, "completed")
        except Exception as error:
            self._close_image_work()
            self._release("dit", "vae")
            self._image_line.popleft()
            self._end(job, Failed(error), "failed")
        return time.perf_counter() - started

    def _close_image_work(self) -> None:
        if self._image_work is not None:
            self._image_work.close()
            self._image_work = None

    def _prefill_unit(self) -> None:
        """One unit of the prompt at the head of the line; prompts of text only cost no unit
        here, so every one that fits joins at once (the generator prefills them together)."""
        while self._prefill_line and self._batch.has_room(self._prefill_line[0]):
            job = self._prefill_line[0]
            try:
                vision = job.needs_vision
                ready = self._batch.prefill(job)
                self._vision_loaded |= vision
                if not ready:
                    return
                self._prefill_line.popleft()
                self._batch.insert(job)
            except Exception as error:
                job.embeddings = job.cache = None
                self._prefill_line.popleft()
                self._end(job, Failed(error), "failed")
                return
            if job.prompt_ids.count(IMAGE_TOKEN_SENTINEL):
                return  # that one took a unit of its own

    def _decode_unit(self) -> None:
        if not len(self._batch):
            return
        try:
            ended = self._batch.step()
        except Exception as error:
            for job in self._batch.reset():
                self._end(job, Failed(error), "failed")
            return
        for job, event in ended:
            self._end(job, event, "completed")

    def _settle_memory(self) -> None:
        """Free the vision tower once no waiting request has a picture to encode."""
        if self.keep_loaded or not self._vision_loaded:
            return
        if any(job.needs_vision for job in (*self._prefill_line, *self._image_line)):
            return
        with self._lock:
            if any(job.needs_vision for job in self._inbox):
                return
        self._release(*VISION)
        self._vision_loaded = False

    def _release(self, *names: str) -> None:
        if not self.keep_loaded:
            self.model.release(*names)


__all__ = ["Scheduler", "QueueFull", "ShuttingDown"]
