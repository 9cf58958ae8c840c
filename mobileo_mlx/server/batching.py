"""Continuous batching of chat answers on mlx-lm's ``BatchGenerator``.

Every chat answer in flight shares each decoding step: one forward pass of the language
model over a batch of one token per sequence (the quantized products read each weight
once for up to 8 rows), so the aggregate tokens/s grows with the number of clients.

A request joins the batch in one of two ways. A prompt of text only goes to the generator as
its token ids: the generator prefills all the prompts that arrived together in one batched
pass (on the CPU a prefill's cost is mostly dequantizing the weights once, whatever the
number of prompts). A prompt with pictures is prefilled here, as embeddings with the features
of its pictures spliced in, into a fresh KV cache, all but the last position, a chunk at a
time; then its last token and that cache are inserted, and the generator merges the cache into
the batch (left padded). A sequence leaves the batch at the end of its turn, at
``max_tokens``, at a stop string, or when its client goes away.

Sampling is per request. ``temperature`` 0 is greedy (one batched argmax for all greedy
sequences); otherwise each request samples with its own random key, from ``seed`` or a fresh
one: the same request with the same seed draws the same numbers whatever else is decoding.
The logits themselves can differ in their last bits between a sequence decoded alone and in a
batch (other matrix shapes, padding), so a seed makes answers reproducible for the same load,
not across loads.

Everything here runs on the scheduler's worker thread (MLX streams belong to a thread).
"""

from __future__ import annotations

import os

import mlx.core as mx

from .jobs import ChatDone, ChatJob, Sampling, TextDelta


class StopText:
    """An answer's text as it grows, cut at the first stop string (which is left out).

    Text that could be the start of a stop string is held back until it is known not to be
    one, so a streamed answer never shows a stop string, even split over several tokens."""

    def __init__(self, detokenizer, stops: tuple = ()) -> None:
        self._detokenizer = detokenizer
        self._stops = tuple(stops)
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self.text = ""
        self._sent = 0
        self._searched = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token: (text that can be sent now, whether a stop string ended the answer)."""
        self._detokenizer.add_token(token)
        self.text += self._detokenizer.last_segment
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """The answer is over: the rest of its text (and whether it held a stop string)."""
        self._detokenizer.finalize()
        self.text += self._detokenizer.last_segment
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self._stops:
            # The stop string that ends first (then the longest of those ending there) ends the
            # answer, however the text was cut into tokens.
            start = max(0, self._searched - self._hold)
            hits = [(at + len(stop), at) for at, stop in ((self.text.find(stop, start), stop) for stop in self._stops)
                    if at >= 0]
            if hits:
                self.text = self.text[:min(hits)[1]]
                delta, self._sent = self.text[self._sent:], len(self.text)
                return delta, True
            self._searched = len(self.text)
        ready = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        delta, self._sent = self.text[self._sent:ready], ready
        return delta, False


def make_sampler(sampling: Sampling):
    """The request's sampler: mlx-lm's greedy one for temperature 0 (shared, so all greedy
    sequences are sampled in one call), else top-p / top-k filtering and a categorical draw
    from this request's own key."""
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler

    if sampling.temperature == 0:
        return greedy_sampler
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
    state = {"key": mx.random.key(seed)}
    inverse_temperature = 1.0 / sampling.temperature
    top_p, top_k = sampling.top_p, sampling.top_k

    def sample(logprobs: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * inverse_temperature, key=key)

    return sample


def make_logits_processors(sampling: Sampling) -> list:
    """Repetition, presence and frequency penalties over the answer so far (mlx-lm's)."""
    from mlx_lm.sample_utils import make_logits_processors as mlx_lm_processors

    if not (sampling.repetition_penalty or sampling.presence_penalty or sampling.frequency_penalty):
        return []
    window = sampling.max_tokens + 1
    return mlx_lm_processors(repetition_penalty=sampling.repetition_penalty, repetition_context_size=window,
                             presence_penalty=sampling.presence_penalty, presence_context_size=window,
                             frequency_penalty=sampling.frequency_penalty, frequency_context_size=window)


class ChatBatch:
    """The chat answers decoding together, and the prefill that admits new ones.

    ``max_sequences``: at most this many answers decode together. ``max_positions``: the
    batch's KV cache (``batch size x longest prompt + max_tokens``, as the batch is padded to
    its longest sequence) stays within this many positions; a request that would go beyond
    waits for room (a request alone always fits)."""

    def __init__(self, model, max_sequences: int = 8, max_positions: int = 16384, prefill_chunk: int = 512):
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        self.model = model
        self.max_sequences = max_sequences
        self.max_positions = max_positions
        self.prefill_chunk = prefill_chunk
        self._tokenizer = TokenizerWrapper(model.tokenizer.hf)
        self._eos = model.tokenizer.eos_token_id
        self._generator = None
        self._jobs: dict[int, ChatJob] = {}
        self._texts: dict[int, StopText] = {}
        self.steps = 0  # decoding steps taken (each advances every sequence by a token)
        self.tokens = 0  # tokens decoded, all sequences together

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> list[ChatJob]:
        return list(self._jobs.values())

    def has_room(self, job: ChatJob) -> bool:
        if not self._jobs:
            return True
        if len(self._jobs) >= self.max_sequences:
            return False
        longest = max(job.length_bound, *(other.length_bound for other in self._jobs.values()))
        return (len(self._jobs) + 1) * longest <= self.max_positions

    # --- joining ------------------------------------------------------------------------

    def prefill(self, job: ChatJob) -> bool:
        """One unit of ``job``'s prompt with pictures: its embeddings first (the vision tower
        runs here), then a chunk of the prefill. True once the job can be inserted (at once for
        a prompt of text only, which the generator prefills)."""
        from mlx_lm.models.cache import make_prompt_cache

        if not job.pictures and job.cache is None:
            return True
        language = self.model.component("language")
        if job.embeddings is None:
            job.embeddings = self.model.embed_prompt(job.prompt, job.pictures)
            mx.eval(job.embeddings)
            job.pictures = []
            job.cache = make_prompt_cache(language)
            job.prefilled = 0
        else:
            end = min(job.prefilled + self.prefill_chunk, job.embeddings.shape[1] - 1)
            # The decoder layers only: the head's logits of a prompt are never needed.
            language.model(None, cache=job.cache, input_embeddings=job.embeddings[:, job.prefilled:end])
            mx.eval([entry.state for entry in job.cache])
            job.prefilled = end
        return job.prefilled >= job.embeddings.shape[1] - 1

    def insert(self, job: ChatJob) -> None:
        """Put a prefilled job into the batch; its first token comes with the next step."""
        from mlx_lm.generate import BatchGenerator

        if self._generator is None:
            # The stream is created here, on the worker thread that uses it. Prompts are
            # prefilled in chunks of prefill_chunk positions, as ours are: on the CPU the
            # attention scores of a chunk (batch x heads x chunk x keys) are held whole.
            self._generator = BatchGenerator(self.model.component("language"), stop_tokens=[[self._eos]],
                                             completion_batch_size=self.max_sequences,
                                             prefill_batch_size=self.max_sequences,
                                             prefill_step_size=self.prefill_chunk,
                                             stream=mx.new_stream(mx.default_device()))
        sampling = job.sampling
        prompt = job.prompt_ids if job.cache is None else [job.last_token]
        (uid,) = self._generator.insert([prompt], max_tokens=[sampling.max_tokens], caches=[job.cache],
                                        samplers=[make_sampler(sampling)],
                                        logits_processors=[make_logits_processors(sampling)])
        job.embeddings = job.cache = None
        self._jobs[uid] = job
        self._texts[uid] = StopText(self._tokenizer.detokenizer, sampling.stop)

    # --- decoding -----------------------------------------------------------------------

    def step(self) -> list[tuple[ChatJob, ChatDone]]:
        """One decoding step of every sequence: posts each answer's new text; returns the
        answers that ended, with their last event (the scheduler posts it)."""
        _, responses = self._generator.next()
        self.steps += 1 if responses else 0
        ended, stopped = [], []
        for response in responses:
            job = self._jobs.get(response.uid)
            if job is None:
                continue
            self.tokens += 1
            job.generated += 1
            text = self._texts[response.uid]
            at_end = response.finish_reason is not None
            if response.finish_reason == "stop":  # the end-of-turn token: not part of the text
                delta, cut = text.finish()
            else:
                delta, cut = text.add(response.token)
                if at_end and not cut:
                    rest, cut = text.finish()
                    delta += rest
            if delta:
                job.post(TextDelta(delta))
            if cut or at_end:
                reason = "stop" if cut or response.finish_reason == "stop" else "length"
                if not at_end:
                    stopped.append(response.uid)
                self._forget(response.uid)
                ended.append((job, ChatDone(reason, job.prompt_tokens, job.generated)))
        if stopped:
            self._generator.remove(stopped)
        return ended

    def remove(self, jobs: list[ChatJob]) -> None:
        """Take ``jobs`` out of the batch (their clients went away)."""
        uids = [uid for uid, job in self._jobs.items() if job in jobs]
        if uids:
            self._generator.remove(uids)
        for uid in uids:
            self._forget(uid)

    def reset(self) -> list[ChatJob]:
        """Drop every sequence and the generator (after an error in a step): the jobs dropped."""
        jobs = self.jobs()
        self._jobs.clear()
        self._texts.clear()
        if self._generator is not None:
            self._generator.close()
        self._generator = None
        return jobs

    def _forget(self, uid: int) -> None:
        self._jobs.pop(uid, None)
        self._texts.pop(uid, None)

