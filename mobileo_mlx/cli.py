"""The `mobileo-mlx` command line. Only argument handling lives here; the work
is done by the package's Python API."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from . import __version__

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

    from . import platform

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
        (f"fp32 matmul {size}^3", f"{platform.matmul_gflops(size):.1f} GFLOP/s"),
        ("memory limit", f"{limit / 2**30:.1f} GiB" if limit else "unknown"),
        ("cache folder", str(platform.cache_dir())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    cached = _cached_models(platform.cache_dir())
    typer.echo(f"{'cached models':<{width}}  {', '.join(cached) if cached else 'none'}")


def _cached_models(root) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("config.json") if p.parent != root)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
