"""The `mobileo-mlx` command line. Only argument handling lives here; the work
is done by the package's Python API."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

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

    from .kernels import quantized_gemv

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
        ("decoding products", quantized_gemv.status() if platform.backend() == "cpu" else "MLX quantized_matmul"),
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
    from .kernels import bf16_matmul

    from . import platform

    reason = bf16_matmul.unavailable_reason()
    if reason:
        return f"unavailable ({reason}); --cpu-matmul auto means fp32"
    with bf16_matmul.bf16_products():
        speed = platform.matmul_gflops(size)
    return f"available, {speed:.1f} GFLOP/s at {size}^3; --cpu-matmul auto means bf16"


# --- model commands ----------------------------------------------------------------------

MODEL_ENV = "MOBILEO_MLX_MODEL"

ModelOption = typer.Option(
    None,
    "--model",
    "-m",
    help="Hub id, original checkpoint folder, converted folder, or 'demo' (a tiny random model, "
    f"works offline). Default: ${MODEL_ENV} or {DEFAULT_MODEL}.",
    show_default=False,
)
LowMemoryOption = typer.Option(
    False, "--low-memory", help="Load each component only while it is needed (lower peak memory, slower)."
)
CpuMatmulOption = typer.Option(
    None,
    "--cpu-matmul",
    help="On the CPU backend, how the vision encoder, DiT and VAE multiply: bf16 (bfloat16 inputs, "
    "float32 sums, ~1.8x faster products; needs AVX512-BF16), fp32, or auto (bf16 where the CPU has "
    "it). The language model always multiplies in float32. Default: $MOBILEO_MLX_CPU_MATMUL or auto.",
    show_default=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    """Report user-facing errors as one line (set MOBILEO_MLX_DEBUG=1 for tracebacks)."""
    from .errors import MobileOError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        # Outputs are written atomically after the last step, so nothing is half-done.
        typer.echo("interrupted: no partial file was written", err=True)
        raise typer.Exit(130)
    except (MobileOError, ValueError, OSError, KeyError, RuntimeError) as error:
        if os.environ.get("MOBILEO_MLX_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _fail(message)


def _load_model(model: Optional[str], low_memory: bool, cpu_matmul: Optional[str] = None):
    from .pipeline import MobileO

    # Only a missing --model means the default: an empty one is refused where it is resolved.
    spec = model if model is not None else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    return MobileO.load(spec, low_memory=low_memory, cpu_matmul=cpu_matmul)


def _free_path(path: Path, force: bool, taken: set) -> Path:
    """``path`` itself, or ``stem-1.ext``, ``stem-2.ext``... so nothing is overwritten silently."""
    if force and path not in taken:
        return path
    candidate, index = path, 0
    while candidate.exists() or candidate in taken:
        index += 1
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
    return candidate


def _save_atomically(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    os.replace(partial, path)


def _peak_memory_line() -> str:
    import resource

    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    if sys.platform == "darwin":
        rss /= 1024  # bytes on macOS
    return f"peak memory: MLX {mx.get_peak_memory() / 2**30:.2f} GiB, process RSS {rss:.2f} GiB"


def _run_images(model, conditioning_fn, count, output, seed, steps, guidance, size, scheduler,
                preview_every, force, tile=None):
    """Shared by generate and edit: condition once, denoise/decode ``count`` images."""
    import time

    from tqdm import tqdm

    from . import samplers

    if count < 1:
        _fail(f"-n must be at least 1, got {count}")
    if steps < 1:
        _fail(f"steps must be at least 1, got {steps}")
    samplers.get_sampler(scheduler)  # an unknown name fails here, before any work
    if preview_every is not None and preview_every < 1:
        _fail(f"--preview-every must be at least 1, got {preview_every}")
    size = model.check_size(size)
    start = time.perf_counter()
    conditioning = conditioning_fn()
    condition_time = time.perf_counter() - start
    typer.echo(f"prompt: {conditioning.prompt_tokens} tokens, LLM + MCP {condition_time:.2f} s", err=True)
    # This process never needs the understanding side again: free it before the DiT runs
    # (with the DiT released before the last decode, this keeps a generation under 2 GB).
    model.release(*model.CONDITIONING_COMPONENTS)
    taken: set = set()
    for number in range(count):
        image_seed = seed + number if seed is not None else int.from_bytes(os.urandom(4), "little")
        target = _free_path(output if count == 1 else output.with_name(f"{output.stem}-{number}{output.suffix}"), force, taken)
        taken.add(target)
        start = time.perf_counter()
        steps_iter = model.generate_latents(conditioning, steps=steps, guidance=guidance, size=size,
                                            seed=image_seed, scheduler=scheduler)
        last = None
        with tqdm(total=steps, desc=f"image {number + 1}/{count}", unit="step", leave=False) as bar:
            for last in steps_iter:
                bar.update(1)
                if preview_every and (last.index + 1) % preview_every == 0 and last.index + 1 < steps:
                    _save_atomically(model.decode(last.latents)[0], target.with_name(f"{target.stem}.preview{target.suffix}"))
        denoise_time = time.perf_counter() - start
        if number == count - 1:
            model.release("dit")
        start = time.perf_counter()
        image = model.decode(last.latents, tile=tile)[0]
        decode_time = time.perf_counter() - start
        _save_atomically(image, target)
        preview = target.with_name(f"{target.stem}.preview{target.suffix}")
        if preview.exists():
            preview.unlink()
        typer.echo(
            f"{target}  (seed {image_seed}; {steps} steps {denoise_time:.2f} s = "
            f"{denoise_time / steps:.2f} s/step, decode {decode_time:.2f} s)"
        )
    typer.echo(_peak_memory_line(), err=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    output: Path = typer.Option(Path("mobileo.png"), "--output", "-o", help="Image file to write; numbered when -n > 1 or when it exists."),
    count: int = typer.Option(1, "-n", "--count", help="How many images (seeds SEED, SEED+1, ...)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: a fresh one, printed)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(1.5, "--guidance", help="Classifier-free guidance scale (1 = off)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels, a multiple of 32 (default: the model's native size, 512)."),
    scheduler: str = typer.Option("dpm", "--scheduler", help="dpm (DPM-Solver++ 2M, the reference) or euler (flow-matching Euler)."),
    preview_every: Optional[int] = typer.Option(None, "--preview-every", help="Decode a preview every K steps next to the output."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    model: Optional[str] = ModelOption,
    low_memory: bool = LowMemoryOption,
    cpu_matmul: Optional[str] = CpuMatmulOption,
) -> None:
    """Generate images from a text prompt."""
    from . import processing

    with _user_errors():
        if not prompt.strip():
            _fail("the prompt is empty")
        mobile_o = _load_model(model, low_memory, cpu_matmul)
        _run_images(
            mobile_o,
            lambda: mobile_o.conditioning(mobile_o._caption_prompt(processing.generation_prompt, prompt)),
            count, output, seed, steps, guidance, size, scheduler, preview_every, force,
        )


@app.command()
def edit(
    image: Path = typer.Argument(..., help="The picture to edit."),
    instruction: str = typer.Argument(..., help="What to change."),
    output: Path = typer.Option(Path("mobileo-edit.png"), "--output", "-o", help="Image file to write (numbered if it exists)."),
    count: int = typer.Option(1, "-n", "--count", help="How many variants."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: a fresh one, printed)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(1.5, "--guidance", help="Classifier-free guidance scale (1 = off)."),
    size: Optional[int] = typer.Option(None, "--size", help="Output side in pixels, a multiple of 32 (default 512)."),
    scheduler: str = typer.Option("dpm", "--scheduler", help="dpm or euler."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    model: Optional[str] = ModelOption,
    low_memory: bool = LowMemoryOption,
    cpu_matmul: Optional[str] = CpuMatmulOption,
) -> None:
    """Edit a picture from an instruction."""
    from . import processing

    with _user_errors():
        if not instruction.strip():
            _fail("the instruction is empty")
        source = processing.load_image(image)
        mobile_o = _load_model(model, low_memory, cpu_matmul)
        _run_images(
            mobile_o,
            lambda: mobile_o.conditioning(mobile_o._caption_prompt(processing.edit_prompt, instruction), source),
            count, output, seed, steps, guidance, size, scheduler, None, force,
        )


def _stream_to_stdout(responses) -> str:
    text = []
    for response in responses:
        typer.echo(response.text, nl=False)
        text.append(response.text)
    typer.echo()
    return "".join(text)


@app.command()
def ask(
    image: Path = typer.Argument(..., help="The picture to ask about."),
    question: str = typer.Argument(..., help="The question."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt."),
    model: Optional[str] = ModelOption,
    cpu_matmul: Optional[str] = CpuMatmulOption,
) -> None:
    """Answer a question about a picture, streaming the answer."""
    from . import processing

    with _user_errors():
        source = processing.load_image(image)
        # One picture per process: the vision tower is freed once its features exist.
        mobile_o = _load_model(model, True, cpu_matmul)
        _stream_to_stdout(mobile_o.ask(source, question, max_tokens=max_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, system=system, stream=True))


@app.command()
def chat(
    message: Optional[str] = typer.Argument(None, help="One message to answer; without it, an interactive chat starts."),
    image: Optional[Path] = typer.Option(None, "--image", help="Attach a picture to the (first) message."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="Sampling temperature (0 = greedy)."),
    system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt."),
    model: Optional[str] = ModelOption,
    cpu_matmul: Optional[str] = CpuMatmulOption,
) -> None:
    """Chat with the model. Interactive commands: /image PATH, /reset, /exit."""
    from . import processing
    from .processing import Message

    with _user_errors():
        attached = processing.load_image(image) if image is not None else None
        mobile_o = _load_model(model, False, cpu_matmul)

        def reply(history, picture):
            return _stream_to_stdout(mobile_o.chat(history, max_tokens=max_tokens, temperature=temperature,
                                                   system=system, image=picture, stream=True))

        if message is not None:
            if not message.strip():
                _fail("the message is empty")
            reply([Message("user", message)], attached)
            return
        typer.echo("Chat with Mobile-O. /image PATH attaches a picture, /reset clears the history, /exit quits.", err=True)
        history: list = []
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                typer.echo()
                return
            if not line:
                continue
            if line in {"/exit", "/quit"}:
                return
            if line == "/reset":
                history, attached = [], None
                typer.echo("(history cleared)", err=True)
                continue
            if line.startswith("/image"):
                try:
                    attached = processing.load_image(Path(line[len("/image"):].strip()))
                    typer.echo("(picture attached to your next message)", err=True)
                except processing.InputError as error:
                    typer.echo(f"error: {error}", err=True)
                continue
            # The picture stays in the conversation: the first message that carried it keeps <image>.
            content = f"{processing.IMAGE_PLACEHOLDER}\n{line}" if attached is not None and not any(
                processing.IMAGE_PLACEHOLDER in m.content for m in history) else line
            history.append(Message("user", content))
            answer = reply(history, attached)
            history.append(Message("assistant", answer.strip()))


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
