"""The ASGI app (FastAPI on uvicorn): routes, errors, authentication, limits, request logs,
and :func:`serve`, which runs it until SIGINT or SIGTERM.

Middleware, outermost first: one log line per request (method, path, status, seconds, and
"cancelled" when its client went away first); the API key (``Authorization: Bearer``) on
every ``/v1/`` route; the body limit (413 before the app sees the body). Every error leaves as
OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) with its status:
400 refused value, 401 wrong or missing key, 404 unknown route or model, 405, 413 body too
large, 422 malformed request, 503 queue full or shutting down (with ``Retry-After``), 500 a
fault of ours (logged with its traceback; the server goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
from typing import Optional

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import InputError, MobileOError
from . import openai_api as api
from . import settings as limits
from .jobs import Cancelled, ChatDone, Failed, ImageJob, ImagesDone, QueueFull, ShuttingDown, TextDelta
from .openai_api import APIError
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("mobileo_mlx.server")

LOG_KEY = "mobileo_mlx.log"  # scope entry the handlers annotate for the request's log line
FINAL_WORDS_S = 5.0  # after the shutdown deadline, for cancelled requests to send their last event


# --- middleware (plain ASGI) ---------------------------------------------------------------


async def _send_error(send, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
    body = json.dumps(api.error_body(message, _error_type(status), code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "authentication_error" if status == 401 else "invalid_request_error"


class RequestLog:
    """One line per request: client, method, path, status, seconds (and why it ended early)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        note = scope[LOG_KEY] = {"status": None, "outcome": ""}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                note["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except Exception as error:  # a fault of ours: the client gets a 500, the server goes on
            log.error("%s %s failed", scope["method"], scope["path"], exc_info=error)
            if note["status"] is None:
                await _send_error(logged_send, 500, f"internal error: {_one_line(error)}")
            else:
                note["outcome"] = "failed after the response started"
        except BaseException:
            note["outcome"] = note["outcome"] or "aborted"
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            outcome = f" {note['outcome']}" if note["outcome"] else ""
            log.info('%s:%s "%s %s" %s %.3fs%s', client[0], client[1], scope["method"], scope["path"],
                     note["status"] or "-", time.perf_counter() - started, outcome)


class APIKey:
    """``Authorization: Bearer KEY`` on every /v1/ route (compared in constant time)."""

    def __init__(self, app, key: Optional[str]):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
                message = ("incorrect API key provided" if header else
                           "missing API key: send Authorization: Bearer KEY (the server's --api-key)")
                return await _send_error(send, 401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimit:
    """Request bodies of at most ``limit`` bytes: a larger declared length is refused before
    reading, an undeclared one as soon as it passes the limit. The body is then replayed to
    the app, and later reads (disconnect detection) go to the client."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than this server's {self.limit / 2**20:g} MiB (--max-body-mb)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                declared_length = int(declared)
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if declared_length > self.limit:
                return await _send_error(send, 413, too_large, "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_error(send, 413, too_large, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# --- the app -------------------------------------------------------------------------------


def create_app(scheduler: Scheduler, settings: Settings, url: str = "") -> FastAPI:
    """The app; ``url``, where it listens, is logged once it is ready (signals handled)."""
    model = scheduler.model
    served = settings.model_id
    started = int(time.time())
    pictures = anyio.CapacityLimiter(limits.DECODING_PICTURES)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        log.info("serving %s on %s (OpenAI API under /v1, docs at /docs)", served, url)
        yield
        await run_in_threadpool(scheduler.stop, 10.0)

    app = FastAPI(title="mobileo-mlx", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of Mobile-O: chat with pictures, image generation, editing.")

    # --- errors

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return JSONResponse(api.error_body(_one_line(error)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(api.error_body("the request body is not valid JSON"), status_code=400)
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return JSONResponse(api.error_body(message + more, param=where or None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path} (the API is under /v1/)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return JSONResponse(api.error_body(str(message), _error_type(error.status_code)),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    def submit(job) -> None:
        job.listen(asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(503, f"the server is busy ({scheduler.max_queue} requests in flight, --max-queue): "
                                "retry shortly", "server_error", "server_busy", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", "server_error", "shutting_down",
                           headers={"Retry-After": "5"}) from None

    # --- routes

    @app.get("/health")
    async def health():
        stats = scheduler.stats()
        return {"status": "ok" if stats["accepting"] else "stopping", "model": served, "version": __version__,
                "uptime_s": round(time.time() - scheduler.started, 1), "requests": stats}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [api.model_card(served, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        api.check_model(model_id, served)
        return api.model_card(served, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, request: Request):
        api.check_model(body.model, served)
        job = await anyio.to_thread.run_sync(
            lambda: api.chat_job(model, body, settings.default_max_tokens, settings.allow_remote_images,
                                 settings.max_body_bytes), limiter=pictures)
        submit(job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(job, request, served, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = []
        event = await _until_done(job, request, on_event=lambda delta: texts.append(delta.text))
        if isinstance(event, Response):
            return event
        return api.chat_completion(job, "".join(texts), event, served)

    @app.post("/v1/images/generations")
    async def image_generations(body: api.ImageGenerationRequest, request: Request):
        api.check_model(body.model, served)
        spec = await run_in_threadpool(
            lambda: api.image_spec(model, prompt=body.prompt, n=body.n, size=body.size,
                                   response_format=body.response_format, output_format=body.output_format,
                                   stream=body.stream, seed=body.seed, steps=body.steps, guidance=body.guidance,
                                   scheduler=body.scheduler))
        return await _run_images(spec, request)

    @app.post("/v1/images/edits")
    async def image_edits(request: Request):
        try:
            form = await request.form(max_files=4, max_fields=64, max_part_size=settings.max_body_bytes)
        except Exception as error:  # not multipart, or a malformed one
            raise APIError(400, f"send the edit as multipart/form-data (image, prompt, ...): {_one_line(error)}")
        try:
            files = form.getlist("image") + form.getlist("image[]")
            if len(files) != 1 or isinstance(files[0], str):
                raise APIError(400, f"send exactly one picture as the file field 'image' (got {len(files)})",
                               param="image")
            if form.get("mask") is not None:
                raise APIError(400, "masks are not supported: the model edits the whole picture from the prompt",
                               param="mask")
            api.check_model(form.get("model") or None, served)
            data = await files[0].read()
            fields = {name: api.form_number(form, name) for name in ("n", "seed", "steps", "guidance")}
            text = {name: form.get(name)
                    for name in ("prompt", "size", "response_format", "output_format", "scheduler")}
            if any(value is not None and not isinstance(value, str) for value in text.values()):
                raise APIError(400, "prompt, size, response_format, output_format and scheduler are text fields")
            if text["prompt"] is None:
                raise APIError(422, "prompt: Field required", param="prompt")
        finally:
            await form.close()

        def spec():
            source = api.picture_from_bytes(data, "the picture to edit")
            return api.image_spec(model, source=source, prompt=text["prompt"], size=text["size"] or None,
                                  response_format=text["response_format"] or None,
                                  output_format=text["output_format"] or None,
                                  scheduler=text["scheduler"] or None, **fields)

        return await _run_images(await anyio.to_thread.run_sync(spec, limiter=pictures), request)

    async def _run_images(spec, request: Request):
        job = ImageJob(spec)
        submit(job)
        event = await _until_done(job, request)
        if isinstance(event, Response):
            return event
        return api.images_response(job, event)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(APIKey, key=settings.api_key)
    app.add_middleware(RequestLog)
    return app


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _failure(event: Failed) -> APIError:
    error = event.error
    if isinstance(error, (InputError, APIError)):
        return error if isinstance(error, APIError) else APIError(400, _one_line(error))
    status = 400 if isinstance(error, MobileOError) else 500
    return APIError(status, _one_line(error), "server_error" if status == 500 else "invalid_request_error")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_done(job, request: Request, on_event=None):
    """Wait for ``job``'s last event while watching the client: if it goes away first, the
    job is cancelled (the worker drops it at its next step) and a 499 is logged."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(job.next_event())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                job.cancel()
                request.scope[LOG_KEY]["outcome"] = "cancelled (the client went away)"
                return Response(status_code=499)
            event = getter.result()
            if isinstance(event, Failed):
                raise _failure(event)
            if isinstance(event, Cancelled):
                request.scope[LOG_KEY]["outcome"] = f"cancelled ({event.reason})"
                raise APIError(503, f"the request was cancelled: {event.reason}", "server_error", "cancelled")
            if isinstance(event, (ChatDone, ImagesDone)):
                return event
            if on_event is not None and isinstance(event, TextDelta):
                on_event(event)
    finally:
        watcher.cancel()
        if not job.ended.is_set():
            job.cancel()


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _chat_stream(job, request: Request, served: str, include_usage: bool):
    """The answer as server-sent events, OpenAI's chunks, ``data: [DONE]`` last. A client
    that goes away cancels the job (Starlette stops this generator)."""
    finished = False
    try:
        yield _sse(api.chat_chunk(job, served, {"role": "assistant", "content": ""}))
        while True:
            event = await job.next_event()
            if isinstance(event, TextDelta):
                yield _sse(api.chat_chunk(job, served, {"content": event.text}))
                continue
            if isinstance(event, ChatDone):
                yield _sse(api.chat_chunk(job, served, {}, event.finish_reason))
                if include_usage:
                    yield _sse(api.usage_chunk(job, served, event))
            elif isinstance(event, Failed):  # the status line is sent already: the error goes in the stream
                yield _sse(_failure(event).body())
            else:
                request.scope[LOG_KEY]["outcome"] = f"cancelled ({event.reason})"
                yield _sse(APIError(503, f"the request was cancelled: {event.reason}", "server_error",
                                    "cancelled").body())
            finished = True
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            job.cancel()
            request.scope[LOG_KEY]["outcome"] = "cancelled (the client went away)"


# --- running -------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server whose SIGINT / SIGTERM first stop the scheduler taking new work; the
    requests in flight then have ``--shutdown-timeout`` seconds to finish before they are
    cancelled. A second signal cancels everything at once. The signal is not raised again
    afterwards (uvicorn's default): :func:`serve` returns 128 + its number."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.grace = grace
        self.deadline: Optional[threading.Timer] = None
        self.signal: Optional[int] = None

    @contextlib.contextmanager
    def capture_signals(self):
        # Handled by the event loop (its wakeup fd), whatever thread the signal lands on.
        # SIGINT is lost while MLX compiles a CPU kernel: glibc's system(), which MLX calls to
        # run the compiler, ignores SIGINT in the whole process meanwhile (SIGTERM is not).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        numbers = (signal.SIGINT, signal.SIGTERM)
        for number in numbers:
            loop.add_signal_handler(number, self.handle_exit, number, None)
        try:
            yield
        finally:
            for number in numbers:
                loop.remove_signal_handler(number)

    def handle_exit(self, number, frame) -> None:
        self.scheduler.drain()
        if self.should_exit:
            self.scheduler.cancel_all()
            self.force_exit = True
        else:
            self.signal = number
            log.info("%s: finishing the requests in flight (up to %gs; again to cancel them)",
                     signal.Signals(number).name, self.grace)
            # At the deadline the work is cancelled, so each request still ends with an answer
            # (a 503, or an error event in its stream); uvicorn cancels what is left a little later.
            self.deadline = threading.Timer(self.grace, self.scheduler.cancel_all)
            self.deadline.daemon = True
            self.deadline.start()
        self.should_exit = True


def serve(model, settings: Settings) -> int:
    """Load what every request needs, listen, serve until SIGINT/SIGTERM; the exit status."""
    _configure_logging(settings.log_level)
    listener = _listen(settings.host, settings.port)  # a taken port is refused before any work
    host, port = listener.getsockname()[:2]
    scheduler = Scheduler(model, max_queue=settings.max_queue, max_batch=settings.max_batch,
                          max_batch_tokens=settings.max_batch_tokens, keep_loaded=settings.keep_loaded)
    server = None
    try:
        scheduler.start()
        app = create_app(scheduler, settings, f"http://{f'[{host}]' if ':' in host else host}:{port}")
        config = uvicorn.Config(app, access_log=False, log_level=settings.log_level, lifespan="on", log_config=None,
                                timeout_graceful_shutdown=settings.shutdown_timeout + FINAL_WORDS_S)
        server = _Server(config, scheduler, settings.shutdown_timeout)
        if not settings.api_key and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("listening beyond this machine without an API key: anyone who reaches port %s can use it "
                        "(--api-key or $%s)", port, limits.API_KEY_ENV)
        server.run(sockets=[listener])
    finally:
        scheduler.stop(5.0)
        listener.close()
        if server is not None and server.deadline is not None:
            server.deadline.cancel()
        # MLX's garbage freed now, on this thread, while MLX is whole: collected at exit by
        # whatever thread runs the collector, after MLX's own teardown, it aborts the process.
        gc.collect()
    counts = scheduler.counts
    log.info("stopped: %d completed, %d cancelled, %d failed, %d refused", counts["completed"], counts["cancelled"],
             counts["failed"], counts["refused"])
    return 128 + server.signal if server.signal else 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.listen(128)
    listener.setblocking(False)
    return listener


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in ("mobileo_mlx.server", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
