"""Everything between user input and the models: messages, prompt templates, the
tokenizer, image-token splicing and picture loading (docs/reference-model.md §3).

The reference pipelines (LLaVA-style, `qwen_2` conversation template):
* a prompt is ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{msg}<|im_end|>\\n<|im_start|>assistant\\n``,
  one ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` turn per message; a message with pictures has
  ``<image>\\n`` per picture before its text (the released model was trained on ``<image>\\n{question}``);
* the text is split on the literal ``<image>``; each chunk is tokenised on its
  own and the chunks are joined by a sentinel (-200) where the 256 projected
  image features go;
* pictures are padded to a square with black, centred, then resized (bicubic)
  to the encoder's size and scaled to [0, 1] (mean 0, std 1).

Prompts are built as :class:`Prompt` (a ``str`` that remembers which of its parts the
template wrote), so user text is always tokenised as text: ``<|im_end|>``, ``<image>`` or any
other added token typed by a user is plain text, never a control token or a picture slot.

Pictures (:func:`load_image`) become 8-bit RGB as transformers' ``convert_to_rgb`` (which the
reference's CLIPImageProcessor applies) makes them: transparency composited on white. Beyond
its 8-bit modes:

* 16-bit samples (modes ``I;16``, ``I;16B``, ``I;16L``, and ``I``, which 16-bit PNGs and TIFFs
  open as) are scaled from 0..65535 to 0..255 (``I`` values are clipped to that range first);
* floating-point samples (mode ``F``, float arrays) must lie in [0, 1] and are scaled to 0..255;
  anything else (negative, above 1, NaN) is refused rather than guessed.

A picture of more than :data:`MAX_IMAGE_PIXELS` (64 MP, an 8192x8192 square: 192 MiB as 8-bit
RGB) is refused from its header, before it is decoded; the vision tower sees 1024x1024 anyway.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import options
from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_SENTINEL = -200
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_TEMPLATE = "Please generate image based on the following caption: {prompt}"
EDIT_TEXT = "Please edit the provided image according to the following description: {instruction}"
EDIT_TEMPLATE = IMAGE_PLACEHOLDER + "\n" + EDIT_TEXT
MAX_PROMPT_TOKENS = 512  # tokenizer_model_max_length of the released checkpoint (generation prompts)
MAX_IMAGE_PIXELS = 8192 * 8192  # refused from the header, before decoding (module docstring)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
URLFetcher = Callable[[str], bytes]


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. ``images`` are the pictures given with this turn: they stay
    attached to it for every later turn (the template writes ``<image>\\n`` per picture before
    ``content``). After :func:`normalize_messages` they are RGB PIL images."""

    role: str  # "system" | "user" | "assistant"
    content: str
    images: tuple = ()


MessagesInput = Union[str, Message, Mapping, Sequence[Union[Message, Mapping, tuple]]]

MESSAGE_KEYS = {"role", "content", "image", "images"}
PART_KEYS = {"text": {"type", "text"}, "image_url": {"type", "image_url"}, "image": {"type", "image"}}
IMAGE_URL_KEYS = {"url", "detail"}  # OpenAI's "detail" (auto/low/high) has no meaning here: ignored


def refuse_remote_url(url: str) -> bytes:
    """The default URL fetcher: pictures are never downloaded by the library (a server may
    pass its own fetcher to :func:`normalize_messages`)."""
    shown = url if len(url) <= 80 else url[:77] + "..."
    raise InputError(f"pictures are not fetched from the network ({shown}): pass a file, an array or a data: URL")


def normalize_messages(value: MessagesInput, image: ImageInput | None = None,
                       fetch_url: URLFetcher = refuse_remote_url) -> list[Message]:
    """Every accepted form of a conversation, as a list of :class:`Message` with loaded pictures.

    ``value``: a str (one user message); a :class:`Message`; a dict ``{"role", "content",
    "image"/"images"}``; an OpenAI-style dict whose ``content`` is a list of parts
    (``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` with a
    ``data:`` URL, ``{"type": "image", "image"}``); a ``(role, content)`` pair; or a list of
    these. ``image`` is added to the last user message. Unknown keys, part types and roles are
    refused with :class:`InputError`, never dropped; remote URLs go to ``fetch_url``.
    """
    if isinstance(value, str):
        items = [Message("user", value)]
    elif isinstance(value, (Message, Mapping)):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise InputError(f"messages must be a str, a Message, a dict or a list of them, got {type(value).__name__}")
    messages = [_one_message(item, index, fetch_url) for index, item in enumerate(items)]
    if not messages or messages[-1].role != "user":
        raise InputError("the conversation must end with a user message")
    if any(message.role == "system" for message in messages[1:]):
        raise InputError("a system message can only come first")
    if image is not None:
        last = messages[-1]
        messages[-1] = dataclasses.replace(last, images=(*last.images, image))
    options.check_prompt_chars(sum(len(message.content) for message in messages))
    last = messages[-1]
    if not last.content.strip() and not last.images:
        raise InputError("the message is empty")
    # Pictures last: the cheap checks above refuse a bad conversation before any decoding.
    return [dataclasses.replace(message, images=tuple(load_image(picture, fetch_url) for picture in message.images))
            if message.images else message for message in messages]


def _one_message(item, index: int, fetch_url: URLFetcher) -> Message:
    where = f"message {index + 1}"
    if isinstance(item, Message):
        role, content, images = item.role, item.content, _as_picture_list(item.images, where)
    elif isinstance(item, Mapping):
        unknown = sorted(map(repr, set(item) - MESSAGE_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (accepted: role, content, image, images)")
        if "role" not in item or "content" not in item:
            raise InputError(f"{where}: a message needs a role and a content")
        role, content = item["role"], item["content"]
        images = [item["image"]] if item.get("image") is not None else []
        images += _as_picture_list(item.get("images"), where)
        if isinstance(content, (list, tuple)):
            content, part_images = _content_parts(content, where, fetch_url)
            images += part_images
    elif isinstance(item, tuple) and len(item) == 2:
        role, content, images = item[0], item[1], ()
    else:
        raise InputError(f"{where}: expected a Message, a dict or a (role, content) pair, got {type(item).__name__}")
    if not isinstance(role, str) or role not in ROLES:
        raise InputError(f"{where}: unknown role {role!r} (accepted: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise InputError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
    images = tuple(images)
    if images and role != "user":
        raise InputError(f"{where}: pictures can only be given with user messages, not {role} ones")
    return Message(role, content, images)


def _as_picture_list(images, where: str) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    raise InputError(f"{where}: images must be a list of pictures, got {type(images).__name__}")


def _content_parts(parts, where: str, fetch_url: URLFetcher) -> tuple[str, list]:
    """OpenAI-style content parts: the text parts joined by newlines, and the pictures."""
    texts, images = [], []
    for number, part in enumerate(parts, 1):
        here = f"{where}, part {number}"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str) or kind not in PART_KEYS:
            shown = repr(kind) if isinstance(part, Mapping) else type(part).__name__
            raise InputError(f"{here}: unknown part type {shown} (accepted: {', '.join(PART_KEYS)})")
        unknown = set(part) - PART_KEYS[kind]
        if unknown or kind not in part:
            raise InputError(f"{here}: a {kind} part holds exactly the keys {', '.join(sorted(PART_KEYS[kind]))}")
        if kind == "text":
            if not isinstance(part["text"], str):
                raise InputError(f"{here}: text must be a str, got {type(part['text']).__name__}")
            texts.append(part["text"])
        elif kind == "image":
            images.append(part["image"])
        else:
            reference = part["image_url"]
            if isinstance(reference, Mapping):
                unknown = sorted(map(repr, set(reference) - IMAGE_URL_KEYS))
                if unknown or "url" not in reference:
                    shown = ", ".join(unknown) if unknown else "no url"
                    raise InputError(f"{here}: image_url holds url (and optionally detail), got {shown}")
                reference = reference["url"]
            if not isinstance(reference, str) or not _is_url(reference):
                raise InputError(f"{here}: image_url must be a data: or http(s) URL")
            images.append(reference)
    return "\n".join(texts), images


# --- prompts ------------------------------------------------------------------------


class Prompt(str):
    """A prompt's text that remembers where its parts came from.

    ``pieces`` is a tuple of ``(kind, value)``: ``("control", token)`` for a control token
    the template wrote, ``("text", text)`` for template or user text (always tokenised as
    text) and ``("image", "")`` for a picture's slot. As a str it is the template's text, with
    ``<image>`` at each slot. String operations return plain ``str``, which
    :meth:`Tokenizer.encode_prompt` reads as a trusted template.
    """

    pieces: tuple

    def __new__(cls, pieces):
        pieces = tuple(pieces)
        text = "".join(IMAGE_PLACEHOLDER if kind == "image" else value for kind, value in pieces)
        prompt = super().__new__(cls, text)
        prompt.pieces = pieces
        return prompt

    def __getnewargs__(self):  # copies and pickles keep the pieces
        return (self.pieces,)


def _turn(role: str, text: str, pictures: int = 0) -> list[tuple[str, str]]:
    return [("control", IM_START), ("text", f"{role}\n"), *[("image", ""), ("text", "\n")] * pictures,
            ("text", text), ("control", IM_END), ("text", "\n")]


def _conversation(turns: Sequence[tuple[str, str, int]], system: str | None) -> Prompt:
    pieces = []
    if system is not None and not (turns and turns[0][0] == "system"):
        pieces += _turn("system", system)
    for role, text, pictures in turns:
        pieces += _turn(role, text, pictures)
    pieces += [("control", IM_START), ("text", "assistant\n")]
    return Prompt(pieces)


def chat_prompt(messages: Sequence[Message], system: str | None = DEFAULT_SYSTEM_PROMPT) -> Prompt:
    """The `qwen_2` template with the assistant turn opened for the reply (a first system
    message replaces ``system``)."""
    return _conversation([(m.role, m.content, len(m.images)) for m in messages], system)


def single_turn_prompt(user_message: str, system: str | None = DEFAULT_SYSTEM_PROMPT, pictures: int = 0) -> Prompt:
    return _conversation([("user", user_message, pictures)], system)


def generation_prompt(prompt: str) -> Prompt:
    return single_turn_prompt(GENERATION_TEMPLATE.format(prompt=prompt))


def edit_prompt(instruction: str) -> Prompt:
    return single_turn_prompt(EDIT_TEXT.format(instruction=instruction), pictures=1)


def understanding_prompt(question: str, system: str | None = DEFAULT_SYSTEM_PROMPT) -> Prompt:
    return single_turn_prompt(question, system, pictures=1)


class Tokenizer:
    """The fast tokenizer of a converted folder (``tokenizer.json``), plus the
    ids the pipelines need. ``hf`` is a transformers fast tokenizer, which is
    what mlx-lm's streaming detokenizer expects."""

    def __init__(self, folder: str | Path, eos_token_id: int | None = None):
        from tokenizers import Tokenizer as FastTokenizer
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        im_end = self.hf.convert_tokens_to_ids(IM_END)
        self.eos_token_id = eos_token_id if eos_token_id is not None else im_end
        self.hf.eos_token = self.hf.convert_ids_to_tokens(self.eos_token_id)
        pad = self.hf.convert_tokens_to_ids("<|endoftext|>")
        if pad is not None:
            self.hf.pad_token = "<|endoftext|>"
        # Text is tokenised by the same tokenizer without its added tokens, so nothing in a
        # text (<|im_end|>, <image>, [IMG]...) can become one: only the template writes them.
        # (`encode_special_tokens` would leave added tokens not marked special matchable.)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        self.added_tokens = {entry["content"]: int(entry["id"]) for entry in spec.get("added_tokens", [])}
        spec["added_tokens"] = []
        self._text = FastTokenizer.from_str(json.dumps(spec))

    def encode(self, text: str) -> list[int]:
        """``text`` as text: Qwen2 adds no BOS, and added tokens written in it are plain text."""
        return self._text.encode(text, add_special_tokens=False).ids

    def control_id(self, token: str) -> int:
        if token not in self.added_tokens:
            raise InputError(f"the tokenizer has no {token} token: not a Qwen2 tokenizer?")
        return self.added_tokens[token]

    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt's ids, -200 at each picture slot, tokenised as the reference does: split on
        the control tokens and each ``<image>``, every text piece tokenised on its own.

        A :class:`Prompt` keeps its user text as text. A plain str is read as a template, as
        the reference reads it: every added token and ``<image>`` written in it counts."""
        pieces = prompt.pieces if isinstance(prompt, Prompt) else self._template_pieces(prompt)
        ids: list[int] = []
        text: list[str] = []
        for kind, value in (*pieces, ("end", "")):
            if kind == "text":
                text.append(value)
                continue
            if text:
                ids.extend(self.encode("".join(text)))
                text = []
            if kind == "control":
                ids.append(self.control_id(value))
            elif kind == "image":
                ids.append(IMAGE_TOKEN_SENTINEL)
        return ids

    encode_with_image_sentinel = encode_prompt

    def _template_pieces(self, text: str) -> list[tuple[str, str]]:
        """A trusted template string cut at ``<image>`` and at every added token (longest first)."""
        tokens = sorted({*self.added_tokens, IMAGE_PLACEHOLDER}, key=len, reverse=True)
        pieces = []
        for index, part in enumerate(re.split("(" + "|".join(map(re.escape, tokens)) + ")", text)):
            if index % 2 == 0:
                pieces.append(("text", part))
            else:
                pieces.append(("image", "") if part == IMAGE_PLACEHOLDER else ("control", part))
        return pieces

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


# --- pictures -----------------------------------------------------------------------

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(image: ImageInput, fetch_url: URLFetcher = refuse_remote_url) -> Image.Image:
    """A picture as an 8-bit RGB PIL image (see the module docstring for the conversions).

    ``image``: a path; a ``data:`` URL (base64); an http(s) URL, given to ``fetch_url``
    (by default refused); a PIL image of any mode; a NumPy array HxW, HxWx1, HxWx3 or
    HxWx4 (RGBA) of uint8, uint16 or floats in [0, 1]."""
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, "the picture")
        try:
            return _to_rgb(image)
        except InputError:
            raise
        except (OSError, ValueError) as error:  # a lazily opened picture decodes here
            raise InputError(f"cannot read the picture: {error}") from None
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, str) and _is_url(image):
        if image.startswith("data:"):
            return _open(io.BytesIO(_data_url_bytes(image)), "the data: URL picture")
        data = fetch_url(image)
        if not isinstance(data, (bytes, bytearray)):
            raise InputError(f"the URL fetcher returned {type(data).__name__}, not bytes")
        return _open(io.BytesIO(data), image)
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        return _open(path, str(path))
    raise InputError(f"unsupported image input of type {type(image).__name__}")


def picture_digest(picture: Image.Image) -> str:
    """A key for a loaded picture's content (its mode, size and pixels)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{picture.mode} {picture.size}".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


def _is_url(text: str) -> bool:
    return text.startswith("data:") or text[:8].lower().startswith(("http://", "https://"))


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputError("a data: URL picture must be base64: data:image/png;base64,...")
    media = header[len("data:"):-len(";base64")]
    if media and not media.startswith("image/"):
        raise InputError(f"a data: URL of type {media} is not a picture")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the data: URL's base64 payload is invalid") from None


def _check_pixels(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"image too large: {name} is {width}x{height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS // 2**20} MP accepted; scale it down first")


def _open(source, name: str) -> Image.Image:
    """Open an encoded picture, check its size from the header, then decode it."""
    # Our bound is lower than Pillow's, so its warning would only be noise before our refusal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as opened:
                _check_pixels(opened.width, opened.height, name)
                picture = _to_rgb(opened)
                # Closing the file closes `opened`: an RGB picture returned as is needs a copy.
                return opened.copy() if picture is opened else picture
        except InputError:
            raise
        except UnidentifiedImageError:
            raise InputError(f"not an image (or an unsupported format): {name}") from None
        except Image.DecompressionBombError:
            raise InputError(f"image too large: {name} has more than {MAX_IMAGE_PIXELS // 2**20} MP; "
                             "scale it down first") from None
        except MemoryError:
            raise
        except Exception as error:  # a damaged file can make a decoder raise anything
            raise InputError(f"cannot read image {name}: {error or type(error).__name__}") from None


def _to_rgb(picture: Image.Image) -> Image.Image:
    mode = picture.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(picture).astype(np.float64), 0, 65535)
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_unit_floats_to_bytes(np.asarray(picture), "a mode F picture")).convert("RGB")
    if mode == "La":  # premultiplied: Pillow converts it to nothing; undo the premultiplication
        luma, alpha = (np.asarray(band, dtype=np.float64) for band in picture.split())
        straight = np.where(alpha > 0, np.round(luma * 255.0 / np.maximum(alpha, 1)), 0)
        picture = Image.merge("LA", [Image.fromarray(np.clip(straight, 0, 255).astype(np.uint8)),
                                     Image.fromarray(alpha.astype(np.uint8))])
    bands = picture.getbands()
    if "A" in bands or "a" in bands or picture.info.get("transparency") is not None:
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture if mode == "RGB" else picture.convert("RGB")


def _unit_floats_to_bytes(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InputError(f"{name} must hold finite values in [0, 1], got NaN or infinity")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise InputError(f"{name} must hold values in [0, 1] (pass 0..255 data as uint8), "
                         f"got [{values.min():g}, {values.max():g}]")
    return np.round(values.astype(np.float64) * 255.0).astype(np.uint8)


def _from_array(array: np.ndarray) -> Image.Image:
    shape = array.shape
    accepted = "HxW, HxWx1, HxWx3 or HxWx4 of uint8, uint16 or floats in [0, 1]"
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise InputError(f"an image array must be {accepted}, got shape {shape} {array.dtype}")
    _check_pixels(shape[1], shape[0], "the picture array")
    if array.ndim == 3 and shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        pixels = _unit_floats_to_bytes(array, "a float image array")
    else:
        raise InputError(f"an image array must be {accepted}, got shape {shape} {array.dtype}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))


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
