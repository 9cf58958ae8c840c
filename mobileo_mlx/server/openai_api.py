"""OpenAI's request and response shapes, and their translation into jobs.

Requests are read in two passes. The schemas below (pydantic) check their shape: a missing
field or a value of the wrong type is a 422. The values are then checked against the bounds
of :mod:`mobileo_mlx.options` and the server's limits: an out-of-range value, a bad picture, a
prompt that is too long or an OpenAI feature this model cannot honour (tools, logprobs,
``n`` > 1 for chat, image URLs in responses) is a 400 with one line that says what to do.
Fields this server has no use for and that change nothing (``user``, ``quality``, ``style``,
``metadata``...) are accepted and ignored, as OpenAI-compatible servers do, so that existing
clients work unchanged.

Pictures arrive as ``data:`` URLs (chat) or uploaded files (edits); http(s) URLs are fetched
only when the server was started with ``--allow-remote-images``; a local path is never read.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
import urllib.error
import urllib.request
import warnings
from typing import Any, Dict, List, Literal, Optional, Union

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .. import options, processing
from ..errors import InputError
from . import settings as limits
from .images import OUTPUT_FORMATS
from .jobs import ChatDone, ChatJob, ImageJob, ImagesDone, ImageSpec, Sampling

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error answered as OpenAI's error JSON, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


# --- schemas ----------------------------------------------------------------------------


class _Open(BaseModel):
    """Unknown fields are accepted and ignored (module docstring)."""

    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: StrictStr
    detail: Optional[StrictStr] = None


class TextPart(_Open):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class ChatMessage(_Open):
    role: StrictStr
    content: Union[StrictStr, List[ContentPart], None] = None


class StreamOptions(_Open):
    include_usage: Optional[StrictBool] = None


class ChatRequest(_Open):
    model: Optional[StrictStr] = None
    messages: List[ChatMessage] = Field(min_length=1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[Number] = None
    max_completion_tokens: Optional[Number] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[Number] = Field(None, description="Extension: sample among the k most likely tokens.")
    repetition_penalty: Optional[Number] = Field(None, description="Extension: mlx-lm's repetition penalty.")
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    seed: Optional[Number] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    n: Optional[Number] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[Number] = None
    logit_bias: Optional[Dict[str, Any]] = None
    tools: Optional[List[Any]] = None
    functions: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None


class ImageGenerationRequest(_Open):
    prompt: StrictStr
    model: Optional[StrictStr] = None
    n: Optional[Number] = None
    size: Optional[StrictStr] = None
    response_format: Optional[StrictStr] = None
    output_format: Optional[StrictStr] = None
    stream: Optional[StrictBool] = None
    seed: Optional[Number] = Field(None, description="Extension: seed of the first image (the next get seed+1, ...).")
    steps: Optional[Number] = Field(None, description="Extension: denoising steps (default 20).")
    guidance: Optional[Number] = Field(None, description="Extension: classifier-free guidance scale (default 1.5).")
    scheduler: Optional[StrictStr] = Field(None, description="Extension: dpm (default) or euler.")


# --- models -------------------------------------------------------------------------------


def check_model(requested: Optional[str], served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} is not served here; this server serves {served!r} "
                            "(GET /v1/models)", code="model_not_found", param="model")


def model_card(served: str, created: int) -> dict:
    return {"id": served, "object": "model", "created": created, "owned_by": "mobileo-mlx"}


# --- chat -----------------------------------------------------------------------------------


def chat_sampling(request: ChatRequest, default_max_tokens: int) -> Sampling:
    """The decoding options of ``request``, checked (InputError or APIError, both 400)."""
    if request.n is not None and request.n != 1:
        raise bad_request("n must be 1: this server returns one answer per request (send several requests)", "n")
    if request.logprobs:
        raise bad_request("logprobs are not supported by this server", "logprobs")
    if request.tools or request.functions:
        raise bad_request("tools and function calling are not supported by this model", "tools")
    if request.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {\"type\": \"text\"} is supported by this model", "response_format")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options needs stream: true", "stream_options")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    checked = options.check_sampling(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None else request.top_k,
        repetition_penalty=request.repetition_penalty,
    )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4:
        raise bad_request(f"stop holds at most 4 strings, got {len(stops)}", "stop")
    if any(not stop for stop in stops):
        raise bad_request("stop strings must not be empty", "stop")
    if any(len(stop) > 256 for stop in stops):
        raise bad_request("stop strings are at most 256 characters long", "stop")
    return Sampling(
        **checked,
        seed=options.check_seed(request.seed),
        presence_penalty=options.check_additive_penalty("presence_penalty", request.presence_penalty),
        frequency_penalty=options.check_additive_penalty("frequency_penalty", request.frequency_penalty),
        stop=tuple(stops),
    )


def chat_job(model, request: ChatRequest, default_max_tokens: int, allow_remote: bool,
             max_body_bytes: int) -> ChatJob:
    """``request`` as a job: options checked, pictures decoded, the prompt's length counted.
    Runs in a worker thread of the server's pool (no MLX: that is the scheduler's)."""
    sampling = chat_sampling(request, default_max_tokens)
    fetch = _remote_fetcher(max_body_bytes) if allow_remote else None
    messages, count = [], 0
    for number, message in enumerate(request.messages, 1):
        converted = _message(message, number, fetch, count)
        count += len(converted.get("images", ()))
        messages.append(converted)
    conversation = processing.normalize_messages(messages)
    pictures = [fit_for_vision(picture, model.vision_size) for message in conversation for picture in message.images]
    prompt = processing.chat_prompt(conversation, processing.DEFAULT_SYSTEM_PROMPT)
    ids = model.prompt_ids(prompt, len(pictures))
    prompt_tokens = len(ids) + len(pictures) * (model.picture_tokens - 1)
    return ChatJob(prompt, pictures, ids, prompt_tokens, sampling)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message(message: ChatMessage, number: int, fetch, pictures_before: int) -> dict:
    """An OpenAI message as a message of :func:`processing.normalize_messages` (its pictures
    decoded): role, text (the text parts joined by newlines, as the library joins them) and
    pictures."""
    where = f"message {number}"
    role = ROLES.get(message.role)
    if role is None:
        raise bad_request(f"{where}: role {message.role!r} is not supported (system, developer, user, assistant)",
                          "messages")
    extra = message.model_extra or {}
    if extra.get("tool_calls") or extra.get("function_call"):
        raise bad_request(f"{where}: tool calls are not supported by this model", "messages")
    content = message.content
    if content is None:
        if role != "assistant":
            raise bad_request(f"{where}: a {message.role} message needs a content", "messages")
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": content}
    texts, pictures = [], []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        if role != "user":
            raise bad_request(f"{where}: pictures can only be given with user messages", "messages")
        if pictures_before + len(pictures) >= limits.MAX_PICTURES:
            raise bad_request(f"at most {limits.MAX_PICTURES} pictures a request", "messages")
        pictures.append(_url_picture(part.image_url.url, f"{where}'s picture {len(pictures) + 1}", fetch))
    converted = {"role": role, "content": "\n".join(texts)}
    if pictures:
        converted["images"] = pictures
    return converted


def _url_picture(url: str, name: str, fetch) -> Image.Image:
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request(f"{name}: a data: URL picture must be base64: data:image/png;base64,...")
        media = header[len("data:"):-len(";base64")]
        if media and not media.startswith("image/"):
            raise bad_request(f"{name}: a data: URL of type {media} is not a picture")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{name}: the data: URL's base64 payload is invalid") from None
        return picture_from_bytes(data, name)
    if url[:8].lower().startswith(("http://", "https://")):
        if fetch is None:
            raise bad_request(f"{name}: pictures are not fetched from URLs by this server (start it with "
                              "--allow-remote-images); send it as a data: URL")
        return picture_from_bytes(fetch(url), name)
    raise bad_request(f"{name}: image_url must be a data: URL (or an http(s) URL where the server allows them)")


def picture_from_bytes(data: bytes, name: str) -> Image.Image:
    """An encoded picture, its size checked from its header (``MAX_PICTURE_PIXELS``) before it
    is decoded, then as :func:`processing.load_image` reads pictures, scaled down to the vision
    tower's largest input (``fit_for_vision``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise bad_request(_too_large(name)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise bad_request(f"{name} is not an image (or an unsupported format)") from None
        width, height = opened.size
        if width * height > limits.MAX_PICTURE_PIXELS:
            raise bad_request(_too_large(name, width, height))
        return processing.load_image(opened)


def fit_for_vision(picture: Image.Image, size: int) -> Image.Image:
    """A picture larger than the vision tower's input, padded to a square and scaled to it,
    exactly as :func:`processing.preprocess_image` would later (which then leaves it as is):
    the features are the same, and a large picture does not stay in memory while it waits."""
    if max(picture.size) <= size:
        return picture
    return processing.expand_to_square(picture).resize((size, size), Image.Resampling.BICUBIC)


def _too_large(name: str, width: int = 0, height: int = 0) -> str:
    shown = f" is {width}x{height} pixels," if width else " has"
    return (f"{name}{shown} more than the {limits.MAX_PICTURE_PIXELS // 2**20} megapixels this server accepts; "
            "scale it down first")


def _remote_fetcher(max_bytes: int):
    def fetch(url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "mobileo-mlx"})
        try:
            with urllib.request.urlopen(request, timeout=limits.REMOTE_TIMEOUT_S) as response:
                data = response.read(max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise bad_request(f"cannot fetch the picture at {url[:80]}: {error}") from None
        if len(data) > max_bytes:
            raise bad_request(f"the picture at {url[:80]} is larger than {max_bytes >> 20} MiB")
        return data

    return fetch


def chat_completion(job: ChatJob, text: str, done: ChatDone, served: str) -> dict:
    return {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion",
        "created": job.created,
        "model": served,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": done.finish_reason}],
        "usage": usage(done),
    }


def chat_chunk(job: ChatJob, served: str, delta: dict, finish_reason: Optional[str] = None) -> dict:
    return {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": served,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(job: ChatJob, served: str, done: ChatDone) -> dict:
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created, "model": served,
            "choices": [], "usage": usage(done)}


def usage(done: ChatDone) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


# --- images ---------------------------------------------------------------------------------


def image_spec(model, *, prompt, n=None, size=None, response_format=None, output_format=None, stream=None,
               seed=None, steps=None, guidance=None, scheduler=None, source: Optional[Image.Image] = None) -> ImageSpec:
    """An image request's options, checked (400 for the first bad one). ``source``: the
    picture to edit (decoded), or None to generate."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("the prompt is empty", "prompt")
    if stream:
        raise bad_request("streamed image responses are not supported by this server", "stream")
    if response_format not in (None, "b64_json"):
        raise bad_request("response_format must be b64_json: this server returns images inline, it keeps no files",
                          "response_format")
    output_format = output_format or "png"
    if output_format not in OUTPUT_FORMATS:
        raise bad_request(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
                          "output_format")
    count = options.integer_in("n", 1 if n is None else n, 1, limits.MAX_IMAGES)
    side = _side(model, size)
    first_seed = options.check_seed(seed, count)
    seeds = [first_seed + number if first_seed is not None else _fresh_seed() for number in range(count)]
    kind = "edit" if source is not None else "generate"
    template = processing.edit_prompt if source is not None else processing.generation_prompt
    spec = ImageSpec(
        prompt=template(prompt),
        count=count,
        size=side,
        steps=options.check_steps(20 if steps is None else steps),
        guidance=options.check_guidance(1.5 if guidance is None else guidance),
        seeds=seeds,
        scheduler=options.check_scheduler("dpm" if scheduler is None else scheduler),
        output_format=output_format,
        source=None if source is None else fit_for_vision(source, model.vision_size),
    )
    ids = model.prompt_ids(spec.prompt, 0 if source is None else 1)
    if len(ids) > processing.MAX_PROMPT_TOKENS:
        raise bad_request(f"the {kind} prompt is {len(ids)} tokens long with its template; the model reads at most "
                          f"{processing.MAX_PROMPT_TOKENS}: shorten it", "prompt")
    return spec


def _side(model, size) -> int:
    """OpenAI's "WxH" (square here), or "auto" / None for the model's native size."""
    if size in (None, "auto"):
        return model.check_size(None)
    width, cross, height = size.lower().partition("x")
    if not cross or not width.isdigit() or not height.isdigit():
        raise bad_request(f"size must be WIDTHxHEIGHT (e.g. \"512x512\") or \"auto\", got {size!r}", "size")
    if width != height:
        raise bad_request(f"size must be square for this model (e.g. \"512x512\"), got {size!r}", "size")
    return model.check_size(int(width))


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def images_response(job: ImageJob, done: ImagesDone) -> dict:
    side = job.spec.size
    return {
        "created": job.created,
        "data": [{"b64_json": base64.b64encode(image).decode("ascii"), "seed": seed}
                 for image, seed in zip(done.images, done.seeds)],
        "output_format": job.spec.output_format,
        "size": f"{side}x{side}",
    }


def form_number(form, name: str) -> Optional[Union[int, float]]:
    """A number from a multipart form field (they are text): int when whole, else float."""
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a form field, not a file", name)
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise bad_request(f"{name} must be a number, got {value[:40]!r}", name) from None


def now() -> int:
    return int(time.time())


__all__ = ["APIError", "ChatRequest", "ImageGenerationRequest", "InputError"]
