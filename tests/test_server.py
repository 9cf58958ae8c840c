"""`mobileo-mlx serve` as users run it: a real server process on 127.0.0.1 with the demo model,
driven by the official `openai` client (and raw HTTP where a client would hide the point).

Answers are compared with the library's own (``mobileo_mlx.load("demo")`` in this process,
same converted weights): a greedy chat answer, a seeded picture. Every wait is bounded; all
traffic stays on the loopback interface."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mobileo_mlx
from mobileo_mlx.processing import Message
from tests.helpers import png_header_only

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
START_TIMEOUT = 180  # the first start converts the demo checkpoint
LISTENING = re.compile(r"serving (\S+) on http://127\.0\.0\.1:(\d+)")


class Server:
    """A `mobileo-mlx serve --model demo --port 0` process; its log is collected as it comes."""

    def __init__(self, cache: Path, *args: str, key: str | None = KEY):
        env = {**os.environ, "MOBILEO_MLX_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        env.pop("MOBILEO_MLX_API_KEY", None)
        command = [sys.executable, "-m", "mobileo_mlx", "serve", "--model", "demo", "--port", "0", *args]
        if key:
            command += ["--api-key", key]
        self.key = key
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(START_TIMEOUT):
            self.kill()
            raise AssertionError("the server did not start:\n" + self.log)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            found = LISTENING.search(line)
            if found:
                self.port = int(found.group(2))
                self._listening.set()
        self._listening.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", self.key or "none"),
                             max_retries=0, timeout=kwargs.pop("timeout", 60), **kwargs)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60):
        """Raw HTTP: (status, headers, parsed JSON or text)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = dict(headers or {})
        if self.key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.key}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        try:
            return response.status, dict(response.getheaders()), json.loads(data)
        except ValueError:
            return response.status, dict(response.getheaders()), data.decode(errors="replace")

    def health(self) -> dict:
        status, _, body = self.request("GET", "/health")
        assert status == 200
        return body["requests"]

    def wait_for(self, condition, timeout: float = 20, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.health()
            if condition(stats):
                return stats
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.health()}\n{self.log}")

    def signal(self, number: int, timeout: float = 60) -> int:
        self.process.send_signal(number)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the server did not exit after the signal:\n" + self.log)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def library(cache):
    """The demo model in this process, on the same converted weights as the servers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILEO_MLX_CACHE", str(cache))
        return mobileo_mlx.load("demo")


@pytest.fixture(scope="module")
def server(cache, library):
    process = Server(cache, "--max-body-mb", "1")
    yield process
    process.signal(signal.SIGTERM)


def library_answer(library, messages, max_tokens: int) -> str:
    """The library's greedy answer, unstripped (as the server returns it)."""
    return "".join(response.text for response in library.chat(messages, max_tokens=max_tokens, stream=True))


def png_bytes(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def decoded(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert picture.format == "PNG"
    return picture


# --- the four capabilities ------------------------------------------------------------------


def test_models_and_health(server):
    client = server.client()
    assert [model.id for model in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    status, _, body = server.request("GET", "/health", headers={"Authorization": ""})
    assert status == 200 and body["status"] == "ok" and body["model"] == "demo"


def test_chat_answers_as_the_library(server, library):
    client = server.client()
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "demo"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == library_answer(library, "Hello there", 12)
    prompt = library.prompt_ids(mobileo_mlx.processing.chat_prompt([Message("user", "Hello there")]))
    assert reply.usage.prompt_tokens == len(prompt)
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streamed(server, library):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five"}]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == library_answer(library, messages, 20)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 20
    # The stream's last line is OpenAI's terminator.
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "demo", "messages": messages, "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.rstrip().endswith("data: [DONE]")


def test_chat_sampling_options(server, library):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    answer = library_answer(library, messages, 24)
    stop = answer[6:9]
    assert stop.strip(), answer  # the demo model's gibberish has text there
    cut = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == answer[:answer.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # A seed makes sampling reproducible: the same request twice, the same answer.
    sampled = [client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0.9,
                                              top_p=0.9, seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    penalised = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, frequency_penalty=1.5,
                                               presence_penalty=-0.5, extra_body={"top_k": 5,
                                                                                  "repetition_penalty": 1.2})
    assert penalised.usage.completion_tokens >= 1


def test_chat_with_pictures_and_history(server, library):
    first, second = png_bytes(1), png_bytes(2, (30, 50))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(first)}}]},
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(second), "detail": "low"}},
                                     {"type": "text", "text": "And this one?"}]},
    ]
    reply = server.client().chat.completions.create(model="demo", messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == library_answer(library, messages, 10)
    text_only = library.prompt_ids(mobileo_mlx.processing.chat_prompt(
        [Message("user", "What is this?", (1,)), Message("assistant", "A pattern."),
         Message("user", "And this one?", (2,))]), 2)
    assert reply.usage.prompt_tokens == len(text_only) + 2 * (library.picture_tokens - 1)


def test_image_generation_matches_the_library(server, library):
    result = server.client().images.generate(model="demo", prompt="a lighthouse", n=2, size="64x64",
                                             response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    pictures = [decoded(item.b64_json) for item in result.data]
    assert [picture.size for picture in pictures] == [(64, 64), (64, 64)]
    for picture, seed in zip(pictures, (5, 6)):
        expected = library.generate("a lighthouse", steps=2, seed=seed, size=64)
        np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))
    assert [item.model_extra["seed"] for item in result.data] == [5, 6]


def test_image_edit_matches_the_library(server, library):
    source = png_bytes(3, (70, 50))
    result = server.client().images.edit(model="demo", image=("source.png", source, "image/png"),
                                         prompt="make it blue", size="64x64", extra_body={"seed": 7, "steps": 2})
    (item,) = result.data
    expected = library.edit(Image.open(io.BytesIO(source)), "make it blue", steps=2, seed=7, size=64)
    np.testing.assert_array_equal(np.asarray(decoded(item.b64_json).convert("RGB")), np.asarray(expected))


# --- errors ----------------------------------------------------------------------------------


def assert_error(call, kind, *fragments):
    with pytest.raises(kind) as caught:
        call()
    error = caught.value.body if isinstance(caught.value.body, dict) else {}
    message = error.get("message", "")
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_every_error_class(server):
    client = server.client()
    chat = client.chat.completions.create
    hello = [{"role": "user", "content": "hi"}]
    # 400: values out of bounds or features this model cannot honour
    assert_error(lambda: chat(model="demo", messages=hello, temperature=50), openai.BadRequestError, "temperature")
    assert_error(lambda: chat(model="demo", messages=hello, max_tokens=0), openai.BadRequestError, "max_tokens")
    assert_error(lambda: chat(model="demo", messages=hello, n=2), openai.BadRequestError, "n must be 1")
    assert_error(lambda: chat(model="demo", messages=hello, presence_penalty=3), openai.BadRequestError,
                 "presence_penalty")
    assert_error(lambda: chat(model="demo", messages=hello, stop=["a", "b", "c", "d", "e"]), openai.BadRequestError,
                 "stop")
    assert_error(lambda: chat(model="demo", messages=hello, tools=[{"type": "function", "function": {"name": "f"}}]),
                 openai.BadRequestError, "tools")
    assert_error(lambda: chat(model="demo", messages=[{"role": "assistant", "content": "x"}]), openai.BadRequestError,
                 "end with a user message")
    assert_error(lambda: chat(model="demo", messages=[{"role": "user", "content": "x" * 70000}]),
                 openai.BadRequestError, "characters")
    def picture(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    assert_error(lambda: chat(model="demo", messages=picture("https://example.com/cat.png")), openai.BadRequestError,
                 "--allow-remote-images")
    assert_error(lambda: chat(model="demo", messages=picture("/etc/passwd")), openai.BadRequestError, "data: URL")
    assert_error(lambda: chat(model="demo", messages=picture("data:image/png;base64,!!!")), openai.BadRequestError,
                 "base64")
    assert_error(lambda: chat(model="demo", messages=picture(data_url(b"not a picture"))), openai.BadRequestError,
                 "not an image")
    huge = data_url(png_header_only(5000, 4000))  # refused from its header, never decoded
    assert_error(lambda: chat(model="demo", messages=picture(huge)), openai.BadRequestError, "5000x4000",
                 "megapixels")
    assert_error(lambda: client.images.generate(model="demo", prompt="x", size="100x100"), openai.BadRequestError,
                 "size")
    assert_error(lambda: client.images.generate(model="demo", prompt="x", size="64x32"), openai.BadRequestError,
                 "square")
    assert_error(lambda: client.images.generate(model="demo", prompt="x", response_format="url"),
                 openai.BadRequestError, "b64_json")
    assert_error(lambda: client.images.generate(model="demo", prompt="x", extra_body={"steps": 5000}),
                 openai.BadRequestError, "steps")
    assert_error(lambda: client.images.edit(model="demo", image=("a.png", b"junk", "image/png"), prompt="x"),
                 openai.BadRequestError, "not an image")
    # 401: a wrong key, no key
    assert_error(lambda: server.client(api_key="wrong").models.list(), openai.AuthenticationError, "API key")
    status, headers, body = server.request("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    # 404: a model not served, a route that does not exist
    assert_error(lambda: chat(model="gpt-4o", messages=hello), openai.NotFoundError, "gpt-4o", "demo")
    status, _, body = server.request("GET", "/v1/nothing")
    assert status == 404 and "no route" in body["error"]["message"]
    # 413: a body over --max-body-mb (1 MiB), declared or chunked
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    status, _, body = server.request("POST", "/v1/chat/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert chunked_post(server, b"y" * (2 << 20)) == 413
    # 422: malformed requests
    assert_error(lambda: chat(model="demo", messages=[]), openai.UnprocessableEntityError)
    assert_error(lambda: chat(model="demo", messages=[{"role": "user", "content": 5}]),
                 openai.UnprocessableEntityError, "content")
    assert_error(lambda: chat(model="demo", messages=hello, max_tokens="ten"), openai.UnprocessableEntityError,
                 "max_tokens")
    status, _, body = server.request("POST", "/v1/chat/completions", b"{not json",
                                     headers={"Content-Type": "application/json"})
    assert status == 400 and "JSON" in body["error"]["message"]
    # ...and the server is as good as new.
    reply = chat(model="demo", messages=hello, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert server.health()["failed"] == 0


def chunked_post(server, payload: bytes) -> int:
    """A body of no declared length (Transfer-Encoding: chunked): its status."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {server.key}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    try:
        for start in range(0, len(payload), 1 << 16):
            piece = payload[start:start + (1 << 16)]
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the end
    status = connection.getresponse().status
    connection.close()
    return status


# --- concurrency ------------------------------------------------------------------------------


def prompts(count: int) -> list[str]:
    return [f"Tell me fact number {number} about {animal}" for number, animal in
            zip(range(count), ["cats", "owls", "bees", "eels", "yaks", "emus", "ants", "elk"] * count)]


def test_eight_concurrent_clients_all_answered_correctly(server, library):
    questions = prompts(8)
    expected = [library_answer(library, question, 16) for question in questions]
    before = server.health()
    barrier = threading.Barrier(8, timeout=30)

    def ask(question: str):
        client = server.client()
        barrier.wait()
        return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                              max_tokens=16)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, questions))
    assert [reply.choices[0].message.content for reply in replies] == expected
    assert len({reply.id for reply in replies}) == 8
    after = server.health()
    assert after["completed"] - before["completed"] == 8 and after["failed"] == before["failed"]
    assert after["decode_steps"] - before["decode_steps"] < 8 * 16  # they shared decoding steps


def test_load_nothing_lost_or_answered_twice(server, library):
    """40 requests from 8 threads, half of them streamed: every one answered once, with its own
    answer, within a minute."""
    questions = prompts(40)
    expected = {question: library_answer(library, question, 8) for question in questions}
    before = server.health()
    started = time.monotonic()

    def ask(number: int):
        client, question = server.client(), questions[number]
        messages = [{"role": "user", "content": question}]
        if number % 2:
            chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            return question, chunks[0].id, text
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
        return question, reply.id, reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(40), timeout=60))
    assert time.monotonic() - started < 60
    assert len(answers) == 40 and len({answer_id for _, answer_id, _ in answers}) == 40
    assert all(text == expected[question] for question, _, text in answers)
    after = server.health()
    assert after["completed"] - before["completed"] == 40
    assert after["failed"] == before["failed"] and after["cancelled"] == before["cancelled"]
    logged = [line for line in server.lines if '"POST /v1/chat/completions" 200' in line]
    assert len(logged) >= 40


def test_a_disconnect_cancels_the_work(server):
    client = server.client()
    before = server.health()["cancelled"]
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=4096, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    stats = server.wait_for(lambda s: s["cancelled"] == before + 1 and s["in_flight"] == 0, what="the cancellation")
    assert stats["decoding"] == 0
    # A plain (not streamed) request whose client hangs up.
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "more"}], "max_tokens": 4096})
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    server.wait_for(lambda s: s["decoding"] == 1, what="the request to decode")
    raw.close()
    server.wait_for(lambda s: s["cancelled"] == before + 2 and s["in_flight"] == 0, what="the second cancellation")
    # An image request whose client hangs up: dropped at its next denoising step.
    body = json.dumps({"model": "demo", "prompt": "a very slow lighthouse", "size": "64x64", "steps": 1000})
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall((f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    completed = server.wait_for(lambda s: s["images"] == 1, what="the image request to start")["completed"]
    raw.close()
    stats = server.wait_for(lambda s: s["cancelled"] == before + 3 and s["in_flight"] == 0,
                            what="the image's cancellation")
    assert stats["images"] == 0 and stats["completed"] == completed
    deadline = time.monotonic() + 10
    while sum("cancelled (the client went away)" in line for line in server.lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("cancelled (the client went away)" in line for line in server.lines) == 3, server.log


def test_chat_answers_while_an_image_is_made(server, library):
    """Chat shares the worker with a long image request: it is answered (correctly) long before
    the image is done."""
    body = json.dumps({"model": "demo", "prompt": "a slow harbour", "size": "64x64", "steps": 1000})
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        raw.sendall((f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        server.wait_for(lambda s: s["images"] == 1, what="the image request to start")
        reply = server.client().chat.completions.create(model="demo", max_tokens=16,
                                                        messages=[{"role": "user", "content": "Meanwhile?"}])
        assert server.health()["images"] == 1  # still denoising
        assert reply.choices[0].message.content == library_answer(library, "Meanwhile?", 16)
    finally:
        raw.close()
    server.wait_for(lambda s: s["in_flight"] == 0, what="the image's cancellation")


# --- queue and signals ---------------------------------------------------------------------------


def test_queue_full_answers_503(cache, library):
    server = Server(cache, "--max-queue", "1", key=None)
    try:
        client = server.client()
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "long"}],
                                                max_tokens=4096, stream=True)
        next(iter(stream))
        status, headers, body = server.request("POST", "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "me too"}], "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "server_busy" and headers["retry-after"] == "1"
        status, _, _ = server.request("POST", "/v1/images/generations", {"model": "demo", "prompt": "a cat"})
        assert status == 503
        stream.close()
        server.wait_for(lambda s: s["in_flight"] == 0, what="the slot to free")
        reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "now"}],
                                               max_tokens=2)
        assert reply.choices[0].message.content is not None
        assert server.health()["refused"] == 2
    finally:
        server.signal(signal.SIGTERM)


def test_sigterm_finishes_the_requests_in_flight(cache, library):
    server = Server(cache, "--shutdown-timeout", "60")
    result = {}

    def ask():
        result["reply"] = server.client().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "a long story"}], max_tokens=1200)

    asker = threading.Thread(target=ask)
    asker.start()
    server.wait_for(lambda s: s["decoding"] == 1, what="the request to decode")
    code = server.signal(signal.SIGTERM, timeout=90)
    asker.join(30)
    assert code == 128 + signal.SIGTERM
    reply = result["reply"]
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    assert "stopped: 1 completed, 0 cancelled" in server.log
    assert "Traceback" not in server.log


def test_sigint_with_a_short_grace_cancels_the_requests_in_flight(cache, library):
    server = Server(cache, "--shutdown-timeout", "0.5")
    # The same prompt once before: MLX has compiled its kernels for it (while MLX compiles, the
    # C library ignores SIGINT: see README, "Serving").
    server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "endless"}],
                                            max_tokens=8)
    stream = server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "endless"}],
                                                     max_tokens=4096, stream=True)
    next(iter(stream))
    started = time.monotonic()
    code = server.signal(signal.SIGINT, timeout=60)
    assert code == 128 + signal.SIGINT and time.monotonic() - started < 30
    with pytest.raises(openai.APIError, match="shutting down"):  # the stream ends with the reason, not an answer
        for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].finish_reason)
    assert "stopped: 1 completed, 1 cancelled" in server.log  # the first request, then the cut one
    assert "Traceback" not in server.log


def test_serve_without_the_extra_says_which_to_install(cache):
    code = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['mobileo-mlx', 'serve', '--model', 'demo']; "
            "from mobileo_mlx.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "MOBILEO_MLX_CACHE": str(cache)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: the server needs its extra (no module fastapi): pip install "mobileo-mlx[server]"']


# --- stop strings (no server) ------------------------------------------------------------------


class _Pieces:
    """A stand-in for mlx-lm's streaming detokenizer: token i is the text ``pieces[i]``."""

    def __init__(self, pieces):
        self.pieces, self.last_segment = pieces, ""

    def add_token(self, token):
        self.last_segment = self.pieces[token]

    def finalize(self):
        self.last_segment = ""


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(alphabet="abc", max_size=3), max_size=12),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3))
def test_stop_strings_cut_the_answer_and_are_never_streamed(pieces, stops):
    from mobileo_mlx.server.batching import StopText

    text = StopText(_Pieces(pieces), tuple(stops))
    sent, stopped = "", False
    for token in range(len(pieces)):
        delta, stopped = text.add(token)
        sent += delta
        if stopped:
            break
    if not stopped:
        delta, stopped = text.finish()
        sent += delta
    whole = "".join(pieces)
    # The first stop string to be complete, reading character by character; it is left out.
    ends = [(whole.find(stop) + len(stop), whole.find(stop)) for stop in stops if stop in whole]
    expected = whole[:min(ends)[1]] if ends else whole
    assert sent == text.text == expected
    assert stopped == bool(ends)


def test_serve_options_are_checked_before_the_model_loads(cache):
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(cache)}

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "mobileo_mlx", "serve", "--model", "demo", *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)

    for args, message in ((["--max-queue", "0"], "error: --max-queue must be between 1 and 10000, got 0"),
                          (["--max-body-mb", "-1"], "error: --max-body-mb must be in (0, 4096], got -1"),
                          (["--log-level", "loud"], "error: --log-level must be debug, info, warning or error")):
        result = serve(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    with socket.socket() as taken:  # a port already in use: one line, no traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = serve("--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:"), result.stderr
