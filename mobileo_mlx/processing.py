"""Everything between user input and the models: prompt templates, the
tokenizer, image-token splicing and image preprocessing (SPEC §3).

The reference pipelines (LLaVA-style, `qwen_2` conversation template):
* a prompt is ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{msg}<|im_end|>\\n<|im_start|>assistant\\n``;
* the text is split on the literal ``<image>``; each chunk is tokenised on its
  own and the chunks are joined by a sentinel (-200) where the 256 projected
  image features go;
* images are padded to a square with black, centred, then resized (bicubic)
  to the encoder's size and scaled to [0, 1] (mean 0, std 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_SENTINEL = -200
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_TEMPLATE = "Please generate image based on the following caption: {prompt}"
EDIT_TEMPLATE = IMAGE_PLACEHOLDER + "\nPlease edit the provided image according to the following description: {instruction}"
MAX_PROMPT_TOKENS = 512  # tokenizer_model_max_length of the released checkpoint
MAX_IMAGE_PIXELS = 16384 * 16384  # refuse decompression bombs before decoding

ImageInput = Union[str, Path, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def chat_prompt(messages: Sequence[Message], system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The `qwen_2` template with the assistant turn opened for the reply."""
    parts = []
    if system is not None and not (messages and messages[0].role == "system"):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def single_turn_prompt(user_message: str, system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    return chat_prompt([Message("user", user_message)], system)


def generation_prompt(prompt: str) -> str:
    return single_turn_prompt(GENERATION_TEMPLATE.format(prompt=prompt))


def edit_prompt(instruction: str) -> str:
    return single_turn_prompt(EDIT_TEMPLATE.format(instruction=instruction))


def understanding_prompt(question: str, system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    return single_turn_prompt(f"{IMAGE_PLACEHOLDER}\n{question}", system)


class Tokenizer:
    """The fast tokenizer of a converted folder (``tokenizer.json``), plus the
    ids the pipelines need. ``hf`` is a transformers fast tokenizer, which is
    what mlx-lm's streaming detokenizer expects."""

    def __init__(self, folder: str | Path, eos_token_id: int | None = None):
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        im_end = self.hf.convert_tokens_to_ids("<|im_end|>")
        self.eos_token_id = eos_token_id if eos_token_id is not None else im_end
        self.hf.eos_token = self.hf.convert_ids_to_tokens(self.eos_token_id)
        pad = self.hf.convert_tokens_to_ids("<|endoftext|>")
        if pad is not None:
            self.hf.pad_token = "<|endoftext|>"

    def encode(self, text: str) -> list[int]:
        # Qwen2 adds no BOS; special tokens written in the text are matched.
        return self.hf.encode(text, add_special_tokens=False)

    def encode_with_image_sentinel(self, text: str) -> list[int]:
        """Tokenise each chunk around ``<image>`` separately, joined by -200."""
        ids: list[int] = []
        for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                ids.append(IMAGE_TOKEN_SENTINEL)
            ids.extend(self.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


def truncate_prompt_ids(ids: list[int], limit: int = MAX_PROMPT_TOKENS) -> tuple[list[int], bool]:
    """Keep the first ``limit`` ids, as the reference tokenizer does (model_max_length)."""
    return (ids[:limit], True) if len(ids) > limit else (ids, False)


# --- images -------------------------------------------------------------------------


def load_image(image: ImageInput) -> Image.Image:
    """A path, a PIL image or an HxWx3 uint8 array, as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got shape {image.shape} {image.dtype}")
        return Image.fromarray(image, "RGB")
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"image too large: {path} is {opened.width}x{opened.height} "
                        f"(at most {MAX_IMAGE_PIXELS} pixels)"
                    )
                return opened.convert("RGB")
        except UnidentifiedImageError:
            raise InputError(f"not an image (or an unsupported format): {path}") from None
        except (OSError, Image.DecompressionBombError) as error:
            raise InputError(f"cannot read image {path}: {error}") from None
    raise InputError(f"unsupported image input of type {type(image).__name__}")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Pad the short side so the image sits centred on a square canvas."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(image: ImageInput, size: int) -> np.ndarray:
    """Pad to square, bicubic resize to ``size``, scale to [0, 1]: [1, size, size, 3] float32 (NHWC)."""
    square = expand_to_square(load_image(image))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32) / 255.0
    return pixels[None]


def to_pil(image01: np.ndarray) -> Image.Image:
    """[H, W, 3] floats in [0, 1] -> RGB PIL image (rounded, as diffusers' numpy_to_pil)."""
    return Image.fromarray((np.clip(image01, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")
