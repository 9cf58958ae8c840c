"""The `mobileo-mlx` command line. Only argument handling lives here; the work
is done by the package's Python API."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options, outputs
from ._version import __version__
from .hub import DEFAULT_MODEL

DEFAULT_SYSTEM = "You are a helpful assistant."

app = typer.Typer(
    name="mobileo-mlx",
    help="Mobile-O in pure MLX: generate and edit images, ask about pictures, chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mobileo-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Mobile-O in pure MLX."""


@app.command()
def doctor(
    size: int = typer.Option(1024, help="Matrix size n for the n x n x n fp32 matmul benchmark."),
) -> None:
    """Print the backend, BLAS, a measured matmul speed, memory and cache facts."""
    import mlx.core as mx

    from .kernels import primitives

    from . import _blas, platform

    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except Exception:  # pragma: no cover - dependency always installed
        mlx_lm_version = "not installed"

    limit = platform.memory_limit_bytes()
    rows = [
        ("mobileo-mlx", __version__),
        ("backend", f"{platform.backend()} ({platform.device_name()})"),
        ("default device", str(mx.default_device())),
        ("compute dtype", str(platform.compute_dtype()).replace("mlx.core.", "")),
        ("mlx", mx.__version__),
        ("mlx-lm", mlx_lm_version),
        ("BLAS", platform.blas_provider()),
        *([("OPENBLAS_THREAD_TIMEOUT", _blas.thread_timeout_at_load)] if _blas.thread_timeout_at_load else []),
        (f"fp32 matmul {size}^3", f"{platform.matmul_gflops(size):.1f} GFLOP/s"),
        ("bf16 CPU matmuls", _bf16_line(size) if platform.backend() == "cpu" else "not used (GPU)"),
        ("native CPU kernels", primitives.status() if platform.backend() == "cpu" else "not used (GPU)"),
        ("memory limit", f"{limit / 2**30:.1f} GiB" if limit else "unknown"),
        ("cache folder", str(platform.cache_dir())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    for key, value in _cached_models(platform.cache_dir()):
        typer.echo(f"{key:<{width}}  {value}")



def _bf16_line(size: int) -> str:
    """doctor's line on bf16 CPU matmuls: why not, or their measured speed."""
    from .kernels import primitives

    from . import backends, platform

    reason = backends.bf16_unavailable_reason()
    if reason:
        return f"unavailable ({reason}); --cpu-matmul auto means fp32"
    speed = platform.matmul_gflops(size, product=primitives.bf16_matmul)
    return f"available, {speed:.1f} GFLOP/s at {size}^3; --cpu-matmul auto means bf16"


# --- model commands ----------------------------------------------------------------------

MODEL_ENV = "MOBILEO_MLX_MODEL"

# Options that several commands share are written once, as the fields of a frozen dataclass (an
# option group: each field an Annotated typer option, with its default). A command takes a group
# as one parameter; `_with_option_groups` shows typer the group's fields in its place.


@dataclass(frozen=True)
class ModelOptions:
    """Which model, and how the CPU multiplies: every command that runs the model."""

    model: Annotated[Optional[str], typer.Option(
        "--model", "-m",
        help="Hub id, original checkpoint folder, converted folder, or 'demo' (a tiny random model, "
        f"works offline). Default: ${MODEL_ENV} or {DEFAULT_MODEL}.",
        show_default=False,
    )] = None
    cpu_matmul: Annotated[Optional[str], typer.Option(
        "--cpu-matmul",
        help="On the CPU backend, how the vision encoder, DiT and VAE multiply: bf16 (bfloat16 inputs, "
        "float32 sums, on AMX tiles or AVX512-BF16: several times faster products; needs AVX512-BF16), fp32, "
        "or auto (bf16 where the CPU has it). The language model takes bf16 only to encode a prompt for a picture; "
        "it answers in float32. Default: "
        "$MOBILEO_MLX_CPU_MATMUL or auto.",
        show_default=False,
    )] = None


OUTPUT_HELP = ("Image file to write (its extension picks the format; none: .png) or folder to write into "
               "(an existing one, or a path ending in /; created if missing). Numbered name-0, name-1... when "
               "-n > 1, and name-1, name-2... when the name is taken.")
# -o, shared too; each command gives its own default.
OutputOption = Annotated[str, typer.Option("--output", "-o", metavar="PATH", help=OUTPUT_HELP)]


@dataclass(frozen=True)
class PictureOptions:
    """generate's and edit's options (`_image_job` checks them before the model loads)."""

    count: Annotated[int, typer.Option(
        "-n", "--count", help=f"How many images (seeds SEED, SEED+1, ...), 1 to {options.MAX_IMAGES}.")] = 1
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Random seed, 0 to 2**64-1 (default: a fresh one, printed).")] = None
    steps: Annotated[int, typer.Option("--steps", help=f"Denoising steps, 1 to {options.MAX_STEPS}.")] = 20
    guidance: Annotated[float, typer.Option(
        "--guidance", help=f"Classifier-free guidance scale, 0 to {options.MAX_GUIDANCE:g} (1 = off).")] = 1.5
    size: Annotated[Optional[int], typer.Option(
        "--size", help=f"Image side in pixels, a multiple of 32 up to {options.MAX_SIZE} "
        "(default: the model's native size, 512).")] = None
    scheduler: Annotated[str, typer.Option(
        "--scheduler", help="dpm (DPM-Solver++ 2M, the reference) or euler (flow-matching Euler).")] = "dpm"
    force: Annotated[bool, typer.Option(
        "--force", help="Replace files already at the output names (never a folder) instead of numbering "
        "new ones.")] = False
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="Load each component only while it is needed (lower peak memory, slower).")] = False


@dataclass(frozen=True)
class AnswerOptions:
    """ask's and chat's options: how the answer is sampled, and the system prompt."""

    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help=f"Longest answer in tokens (1 to {options.MAX_NEW_TOKENS}).")] = 256
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t",
        help=f"Sampling temperature, 0 to {options.MAX_TEMPERATURE:g} (0 = greedy).")] = 0.0
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold, in (0, 1] (1 = off).")] = 1.0
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = off).")] = 0
    repetition_penalty: Annotated[Optional[float], typer.Option(
        "--repetition-penalty",
        help=f"Penalise repeated tokens, in (0, {options.MAX_REPETITION_PENALTY:g}] (1 = off). Default: off.",
        show_default=False,
    )] = None
    system: Annotated[str, typer.Option("--system", help="System prompt.")] = DEFAULT_SYSTEM

    def sampling(self) -> dict:
        """The sampling options, checked (InputError for the first bad one)."""
        return options.check_sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                      top_k=self.top_k, repetition_penalty=self.repetition_penalty)


def _with_option_groups(command):
    """``command`` as typer reads it: each parameter whose type is an option group (a dataclass)
    becomes that group's fields, options in their own right, and reaches ``command`` as one
    instance of the group. Every other parameter stays as it is."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameters, groups = [], {}
    for name, parameter in inspect.signature(command).parameters.items():
        annotation = hints.get(name, parameter.annotation)
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            fields = dataclasses.fields(annotation)
            field_hints = typing.get_type_hints(annotation, include_extras=True)
            groups[name] = (annotation, [field.name for field in fields])
            parameters += [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                             annotation=field_hints[field.name]) for field in fields]
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
    names = [parameter.name for parameter in parameters]
    if len(names) != len(set(names)):
        raise TypeError(f"{command.__name__}: an option group repeats a parameter name ({names})")

    @functools.wraps(command)
    def run(**values):
        for name, (group, fields) in groups.items():
            values[name] = group(**{field: values.pop(field) for field in fields})
        return command(**values)

    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return run


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run cleans up as after Ctrl-C."""


@contextmanager
def _sigterm_raises():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(number, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def _user_errors(files=None):
    """Report user-facing errors as one line (set MOBILEO_MLX_DEBUG=1 for tracebacks). With
    ``files`` (an ``outputs.RunFiles``), every way out, Ctrl-C and SIGTERM included, first
    removes what the run started and did not finish, then says what it kept and removed."""
    from .errors import MobileOError

    def outcome() -> str:
        if files is None:
            return "nothing was written"
        files.clean_up()
        return files.report()

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {outcome()}", err=True)
        raise typer.Exit(130)
    except _Terminated:
        typer.echo(f"terminated: {outcome()}", err=True)
        raise typer.Exit(143)
    except (MobileOError, ValueError, OSError, KeyError, RuntimeError) as error:
        if os.environ.get("MOBILEO_MLX_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        left = outcome()
        if files is not None and (files.written or files.removed):
            message += f" ({left})"
        _fail(message)
    finally:
        if files is not None:
            files.clean_up()


def _load_model(model: Optional[str], low_memory: bool, cpu_matmul: Optional[str] = None):
    from .pipeline import MobileO

    # Only a missing --model means the default: an empty one is refused where it is resolved.
    spec = model if model is not None else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    return MobileO.load(spec, low_memory=low_memory, cpu_matmul=cpu_matmul)


@dataclass(frozen=True)
class _ImageJob:
    """generate's and edit's options, checked."""

    outputs: outputs.OutputPlan
    seed: Optional[int]
    steps: int
    guidance: float
    size: Optional[int]
    scheduler: str
    preview_every: Optional[int]


def _image_job(output, default_name: str, count, seed, steps, guidance, size, scheduler,
               preview_every=None, force: bool = False, cpu_matmul: Optional[str] = None) -> _ImageJob:
    """Every option of generate / edit checked before any work (the model is not loaded yet):
    InputError with one line for the first bad one."""
    from . import backends
    from .errors import InputError

    count = options.check_count(count)
    seed = options.check_seed(seed, count)
    steps = options.check_steps(steps)
    guidance = options.check_guidance(guidance)
    size = None if size is None else options.check_size(size)  # the model checks its own multiple too
    scheduler = options.check_scheduler(scheduler)
    preview_every = options.check_preview_every(preview_every)
    try:
        backends.resolve_cpu_matmul(cpu_matmul)
    except ValueError as error:
        raise InputError(str(error)) from None
    plan = outputs.plan_outputs(output, default_name, count, force)
    return _ImageJob(plan, seed, steps, guidance, size, scheduler, preview_every)


def _peak_memory_line() -> str:
    import resource

    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    if sys.platform == "darwin":
        rss /= 1024  # bytes on macOS
    return f"peak memory: MLX {mx.get_peak_memory() / 2**30:.2f} GiB, process RSS {rss:.2f} GiB"


def _run_images(model, text: str, source, job: _ImageJob, files) -> None:
    """generate's and edit's one path: condition once on the caption (on the instruction and
    its ``source`` picture for edit), then denoise and decode one image per target."""
    import time

    from tqdm import tqdm

    size = model.check_size(job.size)  # the model's own multiple; its native size by default
    # what one stage frees is kept for the next (model.picture_session), given back at the end
    with model.picture_session():
        start = time.perf_counter()
        conditioning = model.caption_conditioning(text, source)
        condition_time = time.perf_counter() - start
        typer.echo(f"prompt: {conditioning.prompt_tokens} tokens, LLM + MCP {condition_time:.2f} s", err=True)
        # This process never needs the understanding side again: free it before the DiT runs
        # (with the DiT released before the last decode, this keeps a generation under 2 GB).
        model.release(*model.STAGES["conditioning"].components)
        plan = job.outputs
        count, steps = len(plan.targets), job.steps
        for number, target in enumerate(plan.targets):
            image_seed = job.seed + number if job.seed is not None else int.from_bytes(os.urandom(4), "little")
            start = time.perf_counter()
            steps_iter = model.generate_latents(conditioning, steps=steps, guidance=job.guidance, size=size,
                                                seed=image_seed, scheduler=job.scheduler)
            last = None
            with tqdm(total=steps, desc=f"image {number + 1}/{count}", unit="step", leave=False) as bar:
                for last in steps_iter:
                    bar.update(1)
                    if job.preview_every and (last.index + 1) % job.preview_every == 0 and last.index + 1 < steps:
                        files.save_preview(model.decode(last.latents)[0], target, plan.format, plan.force)
            denoise_time = time.perf_counter() - start
            if number == count - 1:
                model.release(*model.STAGES["dit"].components)
            start = time.perf_counter()
            image = model.decode(last.latents)[0]
            decode_time = time.perf_counter() - start
            path = files.save(image, target, plan.format, plan.force)
            files.drop_preview(target)
            typer.echo(
                f"{path}  (seed {image_seed}; {steps} steps {denoise_time:.2f} s = "
                f"{denoise_time / steps:.2f} s/step, decode {decode_time:.2f} s)"
            )
        typer.echo(_peak_memory_line(), err=True)


def _picture_job(output: str, default_name: str, picture: PictureOptions, loading: ModelOptions,
                 preview_every: Optional[int] = None) -> _ImageJob:
    """_image_job for a command's option groups."""
    return _image_job(output, default_name, picture.count, picture.seed, picture.steps, picture.guidance,
                      picture.size, picture.scheduler, preview_every, picture.force, loading.cpu_matmul)


@app.command()
@_with_option_groups
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: OutputOption = "mobileo.png",
    picture: PictureOptions = PictureOptions(),
    preview_every: Annotated[Optional[int], typer.Option(
        "--preview-every", help="Write a preview (NAME.preview.EXT) every K steps; removed when the image is done.",
    )] = None,
    loading: ModelOptions = ModelOptions(),
) -> None:
    """Generate images from a text prompt."""
    files = outputs.RunFiles()
    with _sigterm_raises(), _user_errors(files):
        if not prompt.strip():
            _fail("the prompt is empty")
        job = _picture_job(output, "mobileo.png", picture, loading, preview_every)
        mobile_o = _load_model(loading.model, picture.low_memory, loading.cpu_matmul)
        _run_images(mobile_o, prompt, None, job, files)


@app.command()
@_with_option_groups
def edit(
    image: Annotated[Path, typer.Argument(help="The picture to edit.")],
    instruction: Annotated[str, typer.Argument(help="What to change.")],
    output: OutputOption = "mobileo-edit.png",
    picture: PictureOptions = PictureOptions(),
    loading: ModelOptions = ModelOptions(),
) -> None:
    """Edit a picture from an instruction."""
    from . import processing

    files = outputs.RunFiles()
    with _sigterm_raises(), _user_errors(files):
        if not instruction.strip():
            _fail("the instruction is empty")
        job = _picture_job(output, "mobileo-edit.png", picture, loading)
        source = processing.load_image(image)
        mobile_o = _load_model(loading.model, picture.low_memory, loading.cpu_matmul)
        _run_images(mobile_o, instruction, source, job, files)


def _stream_to_stdout(responses) -> str:
    text = []
    try:
        for response in responses:
            typer.echo(response.text, nl=False)
            text.append(response.text)
    finally:
        typer.echo()  # ends the line, also when the answer stops early (Ctrl-C, an error)
        close = getattr(responses, "close", None)
        if close is not None:
            close()
    return "".join(text)


@app.command()
@_with_option_groups
def ask(
    image: Annotated[Path, typer.Argument(help="The picture to ask about.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    answer: AnswerOptions = AnswerOptions(),
    loading: ModelOptions = ModelOptions(),
) -> None:
    """Answer a question about a picture, streaming the answer."""
    from . import processing

    with _user_errors():
        # Every check before the picture is decoded and the model loads.
        sampling = answer.sampling()
        if not question.strip():
            _fail("the question is empty")
        options.check_prompt_chars(len(question) + len(answer.system))
        source = processing.load_image(image)
        # One picture per process: the vision tower is freed once its features exist.
        mobile_o = _load_model(loading.model, True, loading.cpu_matmul)
        _stream_to_stdout(mobile_o.ask(source, question, system=answer.system, stream=True, **sampling))


REPL_HELP = """\
Type a message and press Enter; the conversation is kept until /reset. Commands:
  /image PATH    attach a picture to your next message (repeat for several)
  /reset         forget the conversation and any attached picture
  /help          this list
  /exit, /quit   leave (Ctrl-D too)
Start a line with // to send a message that begins with / (//etc sends /etc).
Ctrl-C stops an answer and drops that turn."""
REPL_COMMANDS = "/image PATH, /reset, /help, /exit"


def _error_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _chat_repl(reply, pictures: list) -> None:
    """The interactive chat. ``reply(messages) -> str`` streams one answer. A failed or
    interrupted turn prints why and leaves the conversation as it was before that turn."""
    from . import processing
    from .errors import MobileOError
    from .processing import Message

    typer.echo("Chat with Mobile-O. /image PATH attaches a picture to your next message, /reset clears the "
               "history, /help lists the commands, /exit (or Ctrl-D) quits.", err=True)
    history: list = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            typer.echo()
            return
        except KeyboardInterrupt:
            typer.echo("\n(Ctrl-D or /exit quits)", err=True)
            continue
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, *rest = line.split(maxsplit=1)
            argument = rest[0].strip() if rest else ""
            if command in {"/exit", "/quit", "/reset", "/help"} and argument:
                typer.echo(f"error: {command} takes no argument", err=True)
            elif command in {"/exit", "/quit"}:
                return
            elif command == "/reset":
                history, pictures = [], []
                typer.echo("(history cleared)", err=True)
            elif command == "/help":
                typer.echo(REPL_HELP, err=True)
            elif command == "/image":
                if len(argument) >= 2 and argument[0] == argument[-1] and argument[0] in "'\"":
                    argument = argument[1:-1]  # a quoted path (as terminals paste dropped files)
                if not argument:
                    typer.echo("error: /image needs a path: /image PATH", err=True)
                    continue
                try:
                    pictures.append(processing.load_image(Path(argument)))
                except MobileOError as error:
                    typer.echo(f"error: {_error_line(error)}", err=True)
                    continue
                count = f"{len(pictures)} pictures" if len(pictures) > 1 else "picture"
                typer.echo(f"({count} attached to your next message)", err=True)
            else:
                typer.echo(f"error: unknown command {command}; the commands are {REPL_COMMANDS} "
                           "(start a line with // to send a message that begins with /)", err=True)
            continue
        message = Message("user", line[1:] if line.startswith("//") else line, tuple(pictures))
        try:
            answer = reply([*history, message])
        except KeyboardInterrupt:
            typer.echo("(answer interrupted: this turn was not kept)", err=True)
            continue
        except (MobileOError, ValueError, OSError, KeyError, RuntimeError) as error:
            if os.environ.get("MOBILEO_MLX_DEBUG"):
                raise
            typer.echo(f"error: {_error_line(error)}", err=True)
            continue
        history += [message, Message("assistant", answer.strip())]
        pictures = []


@app.command()
@_with_option_groups
def chat(
    message: Annotated[Optional[str], typer.Argument(
        help="One message to answer; without it, an interactive chat starts.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Attach a picture to the (first) message.")] = None,
    answer: AnswerOptions = AnswerOptions(),
    loading: ModelOptions = ModelOptions(),
) -> None:
    """Chat with the model. Interactive commands: /image PATH, /reset, /help, /exit."""
    from . import processing
    from .processing import Message

    with _user_errors():
        sampling = answer.sampling()
        if message is not None:
            if not message.strip():
                _fail("the message is empty")
            options.check_prompt_chars(len(message) + len(answer.system))
        pictures = [processing.load_image(image)] if image is not None else []
        mobile_o = _load_model(loading.model, False, loading.cpu_matmul)

        def reply(messages) -> str:
            return _stream_to_stdout(mobile_o.chat(messages, system=answer.system, stream=True, **sampling))

        if message is not None:
            reply([Message("user", message, tuple(pictures))])
        else:
            _chat_repl(reply, pictures)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def convert(ctx: typer.Context) -> None:
    """Convert a Mobile-O checkpoint into an MLX folder (`mobileo-mlx convert --help` lists the options)."""
    from .convert.from_torch import main as convert_main

    raise typer.Exit(convert_main(ctx.args, prog="mobileo-mlx convert"))


def _cached_models(root) -> list[tuple[str, str]]:
    """doctor's lines on the cache: the converted models that pass the check, and what is
    wrong (broken conversions, converted again on next use; stale temporaries, removed)."""
    from .hub import scan_cache

    report = scan_cache(root)
    if report.problem:
        return [("cached models", "none"), ("cache check", f"{report.problem}: set $MOBILEO_MLX_CACHE to a folder")]
    findings = []
    if report.broken:
        names = "; ".join(f"{name} ({problem})" for name, problem in report.broken)
        findings.append(f"{len(report.broken)} broken, converted again on next use: {names}")
    if report.removed:
        findings.append(f"{len(report.removed)} stale temporary folder(s) of killed runs removed")
    return [
        ("cached models", ", ".join(report.models) if report.models else "none"),
        ("cache check", "; ".join(findings) if findings else "no broken or stale entries"),
    ]


@app.command()
@_with_option_groups
def serve(
    loading: ModelOptions = ModelOptions(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; "
                             "set an API key then)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require Authorization: Bearer KEY on /v1/ "
                                          "routes. Default: $MOBILEO_MLX_API_KEY, else none.", show_default=False),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests held at once (working or waiting); more get 503."),
    max_batch: int = typer.Option(8, "--max-batch", help="Chat answers decoding together."),
    max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens",
                                         help="KV-cache positions of the decoding batch (size x longest sequence)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="max_tokens of a chat request that does not say."),
    max_body_mb: float = typer.Option(25.0, "--max-body-mb", help="Largest request body in MiB (413 beyond)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Fetch http(s) image_url pictures (default: data: URLs only)."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout",
                                           help="Seconds the requests in flight get to finish after SIGINT/SIGTERM."),
    keep_loaded: bool = typer.Option(False, "--keep-loaded", help="Keep every component loaded once used (faster "
                                     "image requests, ~1 GB more at full size)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat with pictures, image generation and edits)."""
    try:
        from .server.app import serve as run_server
        from .server.settings import Settings
    except ModuleNotFoundError as error:
        from .server import EXTRA_MODULES

        if (error.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        _fail(f"the server needs its extra (no module {error.name}): pip install \"mobileo-mlx[server]\"")
    with _user_errors():
        bounds = {"--port": (port, 0, 65535), "--max-queue": (max_queue, 1, 10000), "--max-batch": (max_batch, 1, 256),
                  "--max-batch-tokens": (max_batch_tokens, 1, 2**24),
                  "--max-tokens": (max_tokens, 1, options.MAX_NEW_TOKENS)}
        for name, (value, low, high) in bounds.items():
            options.integer_in(name, value, low, high)
        options.real_in("--max-body-mb", max_body_mb, 0.0, 4096.0, low_open=True)
        options.real_in("--shutdown-timeout", shutdown_timeout, 0.0, 86400.0)
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            _fail(f"--log-level must be debug, info, warning or error, got {log_level!r}")
        spec = loading.model if loading.model is not None else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        served = Path(spec).name if Path(spec).is_dir() else spec  # a folder is listed by its name only
        settings = Settings(model_id=served, host=host, port=port,
                            api_key=api_key or Settings.api_key_from_environment(),
                            max_queue=max_queue, max_batch=max_batch, max_batch_tokens=max_batch_tokens,
                            default_max_tokens=max_tokens, max_body_bytes=int(max_body_mb * 2**20),
                            allow_remote_images=allow_remote_images, shutdown_timeout=shutdown_timeout,
                            keep_loaded=keep_loaded, log_level=log_level.lower())
        mobile_o = _load_model(spec, False, loading.cpu_matmul)
        code = run_server(mobile_o, settings)
    # Out without the interpreter's teardown: MLX's stream threads, started from the server's
    # worker thread, sometimes abort the process in MLX's own (std::terminate) once all is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
