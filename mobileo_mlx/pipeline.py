"""The model object users hold: ``generate``, ``edit``, ``ask``, ``chat``.

Data flow (docs/reference-model.md §3):

    understanding: image -> preprocess -> FastViTHD -> projector --+
                   prompt -> template -> tokens -> embeddings --- splice -> Qwen2 -> text
    generation:    prompt -> template -> tokens -> Qwen2 (all hidden states) -> MCP -> cond
                                          zeros of the same shape ----------> MCP -> uncond
                   noise -> [DiT(latent, t, [uncond; cond]) -> CFG -> sampler step] x N -> DC-AE -> image
    editing:       generation, with the source image spliced into the prompt as in understanding

As in mlx-examples' stable_diffusion, the denoising loop is a generator
(:meth:`MobileO.generate_latents`) the caller drives step by step (previews,
progress bars, cancellation); :meth:`MobileO.decode` turns latents into a picture.

Every stage (a picture's features, the conditioning, the denoising loop, the decode, an
answer) runs inside :meth:`MobileO.stage`, the one place that says how a stage runs: MLX's
buffer cache and the release of its components (:attr:`MobileO.STAGES`). How fast a
component runs on this backend is not the pipeline's concern: ``backends.accelerate`` applies
it once, when the component is loaded (:meth:`MobileO.component`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import backends, decoding, options, platform, processing, samplers
from .models.fastvit import FastViTConfig
from .processing import IMAGE_TOKEN_SENTINEL, ImageInput, InputError, Message, MessagesInput


@dataclass
class DenoiseStep:
    """One step of the denoising loop, as yielded by ``generate_latents``."""

    index: int  # 0-based step just completed
    total: int
    timestep: float
    latents: mx.array  # [B, h, w, C] NHWC, after this step


@dataclass
class Conditioning:
    """What the DiT is conditioned on: MCP outputs for the prompt and for zeros."""

    cond: mx.array  # [1, S, caption_channels]
    uncond: mx.array  # [1, S, caption_channels]
    prompt_tokens: int


@dataclass(frozen=True)
class Stage:
    """How one stage runs (:meth:`MobileO.stage`)."""

    components: tuple[str, ...]  # what it may run; with low_memory they are freed when it ends
    buffer_cache: bool  # MLX's CPU buffer cache raised while it runs (backends.stage)
    # Freed memory kept in the process's heap while it runs (backends.stage), but with low_memory. Not for
    # the vision tower: one pass, whose large maps the heap would keep, raising the peak more than it
    # saves time (benchmarks/README.md).
    keep_heap: bool = True
    # With bf16 CPU matmuls, the language model's products in bfloat16 too: it encodes a prompt whose
    # hidden states condition the DiT, and chooses no token (backends.stage's ``encoding``).
    encoding: bool = False


class MobileO:
    """A converted Mobile-O model; components load lazily on first use."""

    # The stages and the components each runs, named once (the command line and the benchmarks
    # use them too). The conditioning, the denoising loop and an answer run the same temporaries
    # over and over (layer after layer, step after step, token after token): they keep them cached.
    STAGES = {
        "vision": Stage(("vision", "projector"), buffer_cache=False, keep_heap=False),  # a picture -> features
        "conditioning": Stage(("language", "vision", "projector", "mcp"), buffer_cache=True,
                              encoding=True),  # -> the DiT's conditioning
        "dit": Stage(("dit",), buffer_cache=True),  # the denoising loop
        "vae": Stage(("vae",), buffer_cache=False),  # latents -> pixels
        "text": Stage(("language",), buffer_cache=True),  # an answer, token by token
    }
    # With bf16 CPU matmuls, the components whose products take bfloat16 inputs (float32 sums):
    # the picture ones, heavy in FLOPs, whose outputs are pixels or features, and the language
    # model only in the stages that encode a prompt (Stage.encoding): where it answers, a token
    # choice may flip on a rounding. The MCP (2.4 M parameters) stays float32.
    BF16_COMPONENTS = ("vision", "projector", "language", "dit", "vae")
    # The features of this many recent pictures are kept (keyed by content), so a conversation's
    # later turns do not run the vision tower again for its pictures (~1 MB each at full size).
    PICTURE_CACHE_SIZE = 8

    def __init__(self, folder: str | Path, *, low_memory: bool = False, cpu_matmul: str | None = None):
        from . import weights

        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise InputError(f"not a converted mobileo-mlx folder (no config.json): {self.folder}")
        self.config = json.loads(config_path.read_text())
        self.low_memory = low_memory
        self.dtype = platform.compute_dtype()
        # "fp32" or "bf16": how MLX's CPU backend multiplies in BF16_COMPONENTS (GPUs: self.dtype).
        try:
            self.cpu_matmul = backends.resolve_cpu_matmul(cpu_matmul) if platform.backend() == "cpu" else "fp32"
        except ValueError as error:
            raise InputError(str(error)) from None
        self._weights = weights
        self._components: dict[str, object] = {}
        self._picture_features: OrderedDict[str, mx.array] = OrderedDict()
        self.tokenizer = processing.Tokenizer(self.folder, self.config["language"].get("eos_token_id"))

    @classmethod
    def load(cls, model: str | os.PathLike = "Amshaker/Mobile-O-0.5B", *, quantize: str | None = None,
             low_memory: bool = False, cpu_matmul: str | None = None) -> "MobileO":
        """``model``: a converted folder, an original checkpoint folder, a hub id or ``"demo"``.
        ``cpu_matmul``: auto (default, or ``$MOBILEO_MLX_CPU_MATMUL``), fp32 or bf16; see ``BF16_COMPONENTS``."""
        from .hub import resolve_model

        kwargs = {} if quantize is None else {"quantize": quantize}
        return cls(resolve_model(str(model), **kwargs), low_memory=low_memory, cpu_matmul=cpu_matmul)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Run the stage ``name`` (a key of ``STAGES``) inside: the backend's stage context
        (``backends.stage``: on the CPU, MLX's buffer cache raised where the policy says so and,
        but with ``low_memory``, freed memory kept in the heap; then restored and emptied); with
        ``low_memory``, its components freed when it ends
        (also on an error or when a generator inside is closed)."""
        policy = self.STAGES[name]
        try:
            with backends.stage(None if policy.buffer_cache else 0, keep_heap=policy.keep_heap and not self.low_memory,
                                encoding=policy.encoding):
                yield
        finally:
            if self.low_memory:
                self.release(*policy.components)

    @contextlib.contextmanager
    def picture_session(self):
        """A picture's stages in a row (conditioning, denoising, decode) inside: what one stage frees is
        kept for the next (``backends.session``), given back when it ends; not with ``low_memory``."""
        with backends.session(keep_heap=not self.low_memory):
            yield

    # --- components -----------------------------------------------------------------

    def component(self, name: str):
        """The MLX module of ``name`` (vision, projector, language, mcp, dit, vae), loaded once and
        made fast for the backend (``backends.accelerate``)."""
        if name not in self._components:
            model = self._weights.load_component(self.folder, name, dtype=self.dtype)
            matmul = self.cpu_matmul if name in self.BF16_COMPONENTS else "fp32"
            self._components[name] = backends.accelerate(model, name, matmul=matmul)
        return self._components[name]

    @property
    def loaded(self) -> tuple[str, ...]:
        """The components in memory now, in the order they were loaded."""
        return tuple(self._components)

    def release(self, *names: str) -> None:
        """Drop components (``--low-memory`` does this between stages) and MLX's buffer cache;
        with no names, also the cached features of recent pictures."""
        for name in names:
            self._components.pop(name, None)
        if not names:
            self._picture_features.clear()
        mx.clear_cache()

    @property
    def vision_size(self) -> int:
        return int(self.config["vision"]["image_size"])

    @property
    def latent_channels(self) -> int:
        return int(self.config["vae"]["latent_channels"])

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (32 for DC-AE f32c32)."""
        return 2 ** (len(self.config["vae"]["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """The image size the DiT was trained for (512 for the released model)."""
        return int(self.config["dit"]["sample_size"]) * int(self.config["dit"].get("patch_size", 1)) * self.vae_scale

    # --- prompts and embeddings -----------------------------------------------------

    @property
    def picture_tokens(self) -> int:
        """Features (prompt positions) per picture: 256 for the released model."""
        return FastViTConfig.from_dict(self.config["vision"]).num_tokens

    def image_features(self, image: ImageInput) -> mx.array:
        """FastViTHD -> projector: [1, N, hidden] features for one picture."""
        pixels = mx.array(processing.preprocess_image(image, self.vision_size)).astype(self.dtype)
        vision, projector = self.component("vision"), self.component("projector")
        with self.stage("vision"):
            features = projector(vision(pixels))
            mx.eval(features)
        return features

    def _features_of(self, image: ImageInput) -> mx.array:
        """``image_features``, or the cached features of the same picture."""
        picture = processing.load_image(image)
        key = processing.picture_digest(picture)
        features = self._picture_features.pop(key, None)
        if features is None:
            features = self.image_features(picture)
        self._picture_features[key] = features  # the most recent last
        while len(self._picture_features) > self.PICTURE_CACHE_SIZE:
            self._picture_features.popitem(last=False)
        return features

    def prompt_ids(self, prompt: str, pictures: int = 0) -> list[int]:
        """The prompt's ids (-200 at each picture slot), checked against its pictures and the
        length bound (text + ``picture_tokens`` a picture) before any model runs."""
        ids = self.tokenizer.encode_prompt(prompt)
        slots = ids.count(IMAGE_TOKEN_SENTINEL)
        if slots != pictures:
            raise InputError(f"the prompt has {slots} picture slot(s) for {pictures} picture(s)")
        options.check_chat_tokens(len(ids) + slots * (self.picture_tokens - 1))
        return ids

    def embed_prompt(self, prompt: str, images: ImageInput | Sequence[ImageInput] | None = None) -> mx.array:
        """Token embeddings of ``prompt`` with each picture's features spliced in at its slot, in
        order: [1, L, D]. ``prompt``: a :class:`processing.Prompt` (its user text stays text) or
        a template string (its control tokens and ``<image>`` count). ``images``: one picture
        or a list."""
        if images is None:
            pictures = []
        elif isinstance(images, (list, tuple)):
            pictures = list(images)
        else:
            pictures = [images]
        ids = self.prompt_ids(prompt, len(pictures))
        # The pictures first: with low_memory the vision tower is gone before the LM loads.
        features = [self._features_of(picture)[0] for picture in pictures]
        language = self.component("language")
        pieces: list[mx.array] = []
        chunk: list[int] = []
        for token in ids + [None]:
            if token is None or token == IMAGE_TOKEN_SENTINEL:
                if chunk:
                    pieces.append(language.embed(mx.array([chunk]))[0])
                    chunk = []
                if token == IMAGE_TOKEN_SENTINEL:
                    pieces.append(features.pop(0).astype(pieces[0].dtype if pieces else self.dtype))
            else:
                chunk.append(token)
        return mx.concatenate(pieces, axis=0)[None].astype(self.dtype)

    def caption_prompt(self, text: str, kind: str = "generate") -> processing.Prompt:
        """The prompt that conditions the DiT: ``kind`` "generate" (``text`` is a caption) or
        "edit" (an instruction about one picture, whose slot the prompt holds). The text is cut,
        with a warning, so that the prompt fits the model's 512 tokens, as the reference's
        tokenizer does (docs/reference-model.md §3.1)."""
        build = _caption_template(kind, text)
        prompt = build(text)
        ids = self.tokenizer.encode_with_image_sentinel(prompt)
        if len(ids) <= processing.MAX_PROMPT_TOKENS:
            return prompt
        excess = len(ids) - processing.MAX_PROMPT_TOKENS
        caption_ids = self.tokenizer.encode(text)
        keep = max(len(caption_ids) - excess, 0)
        while True:
            shortened = self.tokenizer.hf.decode(caption_ids[:keep])
            prompt = build(shortened)
            if len(self.tokenizer.encode_with_image_sentinel(prompt)) <= processing.MAX_PROMPT_TOKENS or keep == 0:
                break
            keep -= 1
        warnings.warn(
            f"the prompt is over the {processing.MAX_PROMPT_TOKENS}-token limit; "
            f"its text was cut to the first {keep} tokens",
            stacklevel=2,
        )
        return prompt

    def caption_conditioning(self, text: str, image: ImageInput | None = None) -> Conditioning:
        """The DiT's conditioning for a caption, or, with ``image``, for an instruction to edit
        that picture: ``conditioning(caption_prompt(text, kind), image)``. What ``generate``
        and ``edit`` condition on."""
        return self.conditioning(self.caption_prompt(text, "generate" if image is None else "edit"), image)

    # --- conditioning and denoising -------------------------------------------------

    def conditioning(self, prompt_text: str, image: ImageInput | None = None) -> Conditioning:
        """MCP(last hidden states) for the prompt, and MCP(zeros of the same shape) for CFG.
        ``prompt_text``: a template (``caption_prompt``); ``image``: the picture of its slot."""
        with self.stage("conditioning"):
            embeddings = self.embed_prompt(prompt_text, image)
            mcp = self.component("mcp")
            layers = int(self.config["mcp"]["num_layers"])
            states = self.component("language").hidden_states(embeddings)[-layers:]
            cond, uncond = mcp(states), mcp([mx.zeros_like(h) for h in states])
            mx.eval(cond, uncond)
        return Conditioning(cond, uncond, embeddings.shape[1])

    def initial_latents(self, size: int, seed: int | None = None, noise=None) -> mx.array:
        """The starting latent, NHWC [1, size/32, size/32, C]; ``noise`` is NCHW like the reference.
        ``seed``: 0 to 2**64 - 1, or None for a fresh one."""
        size = self.check_size(size)
        cells = size // self.vae_scale
        shape = (1, self.latent_channels, cells, cells)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != shape:
                raise InputError(f"noise must have shape {shape} (NCHW) for size {size}, got {noise.shape}")
            if not np.isfinite(noise).all():
                raise InputError("noise must be finite (it holds nan or inf)")
            return mx.array(noise.transpose(0, 2, 3, 1))
        seed = options.check_seed(seed)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        return mx.random.normal((1, cells, cells, self.latent_channels), key=mx.random.key(seed))

    def check_size(self, size: int | None) -> int:
        """``size`` checked (a multiple of the decoder's pixels per latent cell, within
        ``options.MAX_SIZE``), or the native size for None."""
        return options.check_size(self.native_size if size is None else size, self.vae_scale)

    def _denoising_options(self, steps, guidance, size, seed, scheduler) -> dict:
        """generate_latents' options, checked before any work (one InputError for the first bad one)."""
        return {
            "steps": options.check_steps(steps),
            "guidance": options.check_guidance(guidance),
            "size": self.check_size(size),
            "seed": options.check_seed(seed),
            "scheduler": options.check_scheduler(scheduler),
        }

    def generate_latents(
        self,
        conditioning: Conditioning,
        *,
        steps: int = 20,
        guidance: float = 1.5,
        size: int | None = None,
        seed: int | None = None,
        noise=None,
        scheduler: str = "dpm",
    ) -> Iterator[DenoiseStep]:
        """The denoising loop as a generator: one ``DenoiseStep`` per step. The options are
        checked by this call (InputError), before the first step is asked for."""
        checked = self._denoising_options(steps, guidance, size, seed, scheduler)
        latents = self.initial_latents(checked["size"], checked["seed"], noise)
        return self._denoise(conditioning, latents, checked["steps"], checked["guidance"],
                             samplers.get_sampler(checked["scheduler"]))

    def _denoise(self, conditioning: Conditioning, latents: mx.array, steps: int, guidance: float,
                 sampler) -> Iterator[DenoiseStep]:
        dit = self.component("dit")
        plan = sampler.plan(samplers.SchedulerConfig.from_dict(self.config["scheduler"]), steps)
        use_cfg = guidance != 1.0  # v_u + 1·(v_c − v_u) = v_c: skip the unconditional half
        context = (
            mx.concatenate([conditioning.uncond, conditioning.cond]) if use_cfg else conditioning.cond
        ).astype(self.dtype)
        text = dit.encode_text(context)  # caption projection + every block's cross K/V, once

        def step(index: int, timestep, latents: mx.array, state):
            model_input = latents.astype(self.dtype)
            if use_cfg:
                model_input = mx.concatenate([model_input, model_input])
            velocity = dit(model_input, time=dit.embed_timestep(float(timestep)), text=text)
            velocity = velocity.astype(mx.float32)
            if use_cfg:
                v_uncond, v_cond = velocity[:1], velocity[1:]
                velocity = v_uncond + guidance * (v_cond - v_uncond)
            return sampler.step(plan, state, index, latents, velocity)

        state = sampler.initial_state(plan)
        with self.stage("dit"):  # the whole loop: its buffer cache, then the DiT's release
            for index, timestep in enumerate(plan.timesteps):
                latents, state = step(index, timestep, latents, state)
                mx.eval(latents)
                yield DenoiseStep(index, steps, float(timestep), latents)

    def decode(self, latents: mx.array, tile: int | None = None) -> list[Image.Image]:
        """DC-AE decode (latents / scaling factor), then [-1, 1] -> [0, 1] -> PIL images.
        By default the whole picture, exactly; ``tile``: overlapping tiles of ``tile`` x
        ``tile`` latents, decoded one at a time and blended (an approximation, for memory)."""
        vae = self.component("vae")
        scaled = (latents / float(self.config["vae"]["scaling_factor"])).astype(self.dtype)
        with self.stage("vae"):
            images = mx.clip(_decoded(vae, scaled, tile).astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
            mx.eval(images)
        return [processing.to_pil(np.array(image)) for image in images]

    # --- the four user-facing calls -------------------------------------------------

    def generate(self, prompt: str, steps: int = 20, guidance: float = 1.5, seed: int | None = None,
                 noise=None, size: int | None = None, scheduler: str = "dpm") -> Image.Image:
        """Text to image. With ``noise`` (NCHW, the reference layout) the result is deterministic."""
        return self._picture("generate", prompt, None, steps, guidance, seed, noise, size, scheduler)

    def edit(self, image: ImageInput, instruction: str, steps: int = 20, guidance: float = 1.5,
             seed: int | None = None, noise=None, size: int | None = None, scheduler: str = "dpm") -> Image.Image:
        """Instruction-based editing: the source picture enters through the LLM context only."""
        return self._picture("edit", instruction, image, steps, guidance, seed, noise, size, scheduler)

    def _picture(self, kind: str, text: str, image: ImageInput | None, steps, guidance, seed, noise, size,
                 scheduler) -> Image.Image:
        """generate's and edit's one path: every input checked before the models run, then the
        caption's conditioning, the denoising loop and the decode."""
        _caption_template(kind, text)  # the first error a caller sees
        self._denoising_options(steps, guidance, size, seed, scheduler)
        source = processing.load_image(image) if kind == "edit" else None
        with self.picture_session():
            conditioning = self.caption_conditioning(text, source)
            last = None
            for last in self.generate_latents(conditioning, steps=steps, guidance=guidance, size=size,
                                              seed=seed, noise=noise, scheduler=scheduler):
                pass
            return self.decode(last.latents)[0]

    def ask(self, image: ImageInput, question: str, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, repetition_penalty: float | None = None,
            system: str | None = processing.DEFAULT_SYSTEM_PROMPT, stream: bool = False):
        """Answer a question about a picture; ``stream=True`` yields responses with ``.text`` and ``.token``."""
        sampling = options.check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, repetition_penalty=repetition_penalty)
        if not isinstance(question, str):
            raise InputError(f"the question must be a str, got {type(question).__name__}")
        if not question.strip():
            raise InputError("the question is empty")
        return self._reply(processing.normalize_messages([Message("user", question, (image,))]), system,
                           sampling, stream)

    def chat(self, message_or_messages: MessagesInput, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float | None = None,
             system: str | None = processing.DEFAULT_SYSTEM_PROMPT, image: ImageInput | None = None,
             stream: bool = False):
        """Chat, multi-turn when given a list of messages; each picture stays with the turn it
        was given with. Messages: a str, :class:`Message`, ``{"role", "content", "image"/"images"}``,
        OpenAI-style content parts, or ``(role, content)`` (``processing.normalize_messages``).
        ``image`` attaches a picture to the last user message. A first system message replaces
        ``system``."""
        sampling = options.check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, repetition_penalty=repetition_penalty)
        return self._reply(processing.normalize_messages(message_or_messages, image), system, sampling, stream)

    def _reply(self, messages: list[Message], system: str | None, sampling: dict, stream: bool):
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be a str or None, got {type(system).__name__}")
        options.check_prompt_chars(sum(len(m.content) for m in messages) + len(system or ""))
        pictures = [picture for message in messages for picture in message.images]
        embeddings = self.embed_prompt(processing.chat_prompt(messages, system), pictures)
        responses = self._stream_text(embeddings, **sampling)
        return responses if stream else _join(responses)

    def _stream_text(self, embeddings: mx.array, max_tokens: int, temperature: float, top_p: float,
                     top_k: int, repetition_penalty: float | None):
        """Decode from the prompt's embeddings; the options were checked (options.check_sampling)."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
        processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
        responses = stream_generate(
            self.component("language"),
            self.tokenizer.hf,
            prompt=mx.array([], dtype=mx.uint32),
            input_embeddings=embeddings[0],
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
        )
        return self._answer(responses)

    def _answer(self, responses):
        """mlx-lm's responses, produced inside the "text" stage (the prefill and every decoding step)."""
        with self.stage("text"):
            yield from responses


# The prompts that condition the DiT, by kind: their template, and what their text is called.
CAPTIONS = {"generate": (processing.generation_prompt, "prompt"), "edit": (processing.edit_prompt, "instruction")}


def _caption_template(kind: str, text):
    """The template of ``kind``, once ``text`` is known to be some text for it."""
    if kind not in CAPTIONS:
        raise InputError(f"unknown caption kind {kind!r}: expected one of {', '.join(CAPTIONS)}")
    build, name = CAPTIONS[kind]
    if not isinstance(text, str):
        raise InputError(f"the {name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"the {name} is empty")
    return build


def _decoded(vae, latents: mx.array, tile: int | None) -> mx.array:
    """The decode strategy, chosen here only: the whole picture, exactly, in row bands (the
    decoder's peak memory); overlapping tiles only when asked (an approximation)."""
    decode = functools.partial(decoding.decode_in_row_bands, vae)
    return decode(latents) if tile is None else decoding.decode_tiled(decode, latents, tile=tile)


def _join(responses) -> str:
    return "".join(response.text for response in responses).strip()
