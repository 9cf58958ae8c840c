"""The bounds of every option of generate / edit / ask / chat, checked before any work starts.

One place for the Python API (``MobileO``'s methods), the command line and the server. Each
check returns the value (converted where that is lossless, e.g. ``20.0`` steps -> ``20``) or
raises :class:`~mobileo_mlx.errors.InputError` with one line that names the option, the value
and the bound. The README's command-line section lists the same bounds.

Why these bounds:

* steps: the scheduler has 1000 training timesteps; more inference steps than that would repeat
  timesteps (diffusers refuses them too).
* images per call: each one is denoised and decoded in turn (about a minute on a 2-core CPU),
  so the bound is about time, not memory.
* size: the DiT was trained at 512²; 1024² (four times the area) keeps the DC-AE decoder's
  largest activations, decoded in row bands, within a 2 GB budget. Sizes are multiples of the
  decoder's 32 pixels per latent cell.
* prompt tokens for ask and chat: the text plus 256 tokens per picture. The prefill's time
  grows with the square of the length and the key/value cache by ~24 KB a token; 4096 tokens
  is a few seconds of prefill on a GPU and well under a minute on a 2-core CPU.
* prompt characters for ask and chat: checked before tokenising, so a huge text costs
  nothing. 16 characters a token (16 x 4096) is far beyond natural text (about 4 for English,
  1 to 2 for Chinese), so what this refuses is, but for freak texts, over the token bound too.
* new tokens: as many as the prompt may hold.
* seeds: MLX's random keys are 64-bit.
* guidance: 1 turns classifier-free guidance off, 0 keeps only the unconditional prediction;
  the reference uses 1.5 and pictures burn out long before 30.
* previews (``--preview-every K``): every K steps, so 1 up to the most steps there can be.
* schedulers: the samplers of :mod:`mobileo_mlx.samplers`, by name.
* presence and frequency penalties (the server's OpenAI options): OpenAI's range, -2 to 2;
  they are added to logits, where a few units already decide between two tokens.
"""

from __future__ import annotations

import math
import numbers

from .errors import InputError

MAX_STEPS = 1000
MAX_IMAGES = 100
MIN_SIZE = 32
MAX_SIZE = 1024
MAX_GUIDANCE = 30.0
MAX_CHAT_TOKENS = 4096
MAX_NEW_TOKENS = MAX_CHAT_TOKENS
MAX_PROMPT_CHARS = 16 * MAX_CHAT_TOKENS
MAX_TEMPERATURE = 10.0
MAX_REPETITION_PENALTY = 10.0
MAX_ADDITIVE_PENALTY = 2.0
SEED_LIMIT = 2**64  # seeds are 0 <= seed < SEED_LIMIT


def _shown(value) -> str:
    """``value`` for a one-line message: a 2**2000 seed is shown by its first digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _integer(name: str, value) -> int:
    """``value`` as an int when it is a whole number (``True``/``False`` are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or value != int(value):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {_shown(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int or fraction beyond float range
        raise InputError(f"{name} must be a finite number, got {_shown(value)}") from None
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def integer_in(name: str, value, low: int, high: int) -> int:
    number = _integer(name, value)
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {_shown(number)}")
    return number


def real_in(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    number = _real(name, value)
    if number < low or number > high or (low_open and number == low):
        bracket = "(" if low_open else "["
        raise InputError(f"{name} must be in {bracket}{low:g}, {high:g}], got {number:g}")
    return number


def check_steps(steps) -> int:
    return integer_in("steps", steps, 1, MAX_STEPS)


def check_count(count) -> int:
    return integer_in("the number of images", count, 1, MAX_IMAGES)


def check_size(size, multiple: int = MIN_SIZE) -> int:
    """A side length in pixels: a multiple of ``multiple`` (the decoder's pixels per latent cell)."""
    size = _integer("size", size)
    if size < multiple or size > MAX_SIZE or size % multiple:
        raise InputError(f"size must be a multiple of {multiple} between {multiple} and {MAX_SIZE}, got {_shown(size)}")
    return size


def check_guidance(guidance) -> float:
    return real_in("guidance", guidance, 0.0, MAX_GUIDANCE)


def check_seed(seed, count: int = 1) -> int | None:
    """``None`` (a fresh random seed) or a whole number such that seeds ``seed`` ...
    ``seed + count - 1`` are all valid 64-bit seeds."""
    if seed is None:
        return None
    seed = _integer("seed", seed)
    if seed < 0 or seed + count - 1 >= SEED_LIMIT:
        last = f" (and seed + {count - 1} for {count} images)" if count > 1 else ""
        raise InputError(f"seed must be between 0 and 2**64 - 1{last}, got {_shown(seed)}")
    return seed


def check_preview_every(every) -> int | None:
    """``None`` (no previews) or a preview every ``every`` steps."""
    return None if every is None else integer_in("--preview-every", every, 1, MAX_STEPS)


def check_scheduler(name) -> str:
    """The name of one of the samplers (``dpm``, ``euler``)."""
    from .samplers import SAMPLERS

    if not isinstance(name, str) or name not in SAMPLERS:
        raise InputError(f"unknown sampler {_shown(name)}: --scheduler must be one of {', '.join(SAMPLERS)}")
    return name


def check_sampling(*, max_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=None) -> dict:
    """The text-generation options, checked and converted: a dict of the same keys."""
    return {
        "max_tokens": integer_in("max_tokens", max_tokens, 1, MAX_NEW_TOKENS),
        "temperature": real_in("temperature", temperature, 0.0, MAX_TEMPERATURE),
        "top_p": real_in("top_p", top_p, 0.0, 1.0, low_open=True),
        "top_k": integer_in("top_k", top_k, 0, 2**31 - 1),
        "repetition_penalty": None if repetition_penalty is None else real_in(
            "repetition_penalty", repetition_penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True),
    }


def check_additive_penalty(name: str, value) -> float | None:
    """A presence or frequency penalty: None (off) or a number from -2 to 2."""
    return None if value is None else real_in(name, value, -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY)


def check_chat_tokens(count: int, limit: int = MAX_CHAT_TOKENS) -> int:
    if count > limit:
        raise InputError(
            f"the prompt is {count} tokens long (text and 256 a picture); at most {limit} are accepted: "
            "shorten it or start a new conversation"
        )
    return count


def check_prompt_chars(count: int, limit: int = MAX_PROMPT_CHARS) -> int:
    """A cheap bound on a conversation's characters, checked before tokenising it (so a 50 MB
    string is refused at once); :func:`check_chat_tokens` is the real bound."""
    if count > limit:
        raise InputError(
            f"the prompt is {count} characters long; at most {limit} are accepted: "
            "shorten it or start a new conversation"
        )
    return count
