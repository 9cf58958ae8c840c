"""The command lines the benchmark scripts share, and how a parent hands its options to a worker.

A script builds its parser from these option groups, adds its own options, and calls ``main``:
without ``--worker`` it runs the parent (which starts one worker process per side), with
``--worker SIDE`` the worker of that side, whose result goes back as one JSON line.
"""

from __future__ import annotations

import argparse
from typing import Callable

from benchmarks import measure
from benchmarks.inputs import RECIPES

SIDES = ("mlx", "torch-fp32", "torch-bf16")
CPU_MATMULS = ("auto", "fp32", "bf16")


def parser(script: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m <script>``; its description is the first line of ``doc``."""
    return argparse.ArgumentParser(prog=f"python -m {script}", description=doc.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, default="none",
                        help="Quantization recipe of the MLX side (default: none, the same weights as PyTorch).")


def add_sides(parser: argparse.ArgumentParser, warmup: str, keep_loaded: str) -> None:
    """Which sides run and how: ``--sides``, ``--warmup`` (``warmup`` says what it runs),
    ``--threads``, ``--keep-loaded`` (``keep_loaded``: what it keeps), ``--cpu-matmul``."""
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Comma-separated subset of {', '.join(SIDES)}.")
    parser.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                        help=f"{warmup} before timing (auto: on GPUs only).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both sides (OpenBLAS / OpenMP / torch); default: the libraries' own.")
    parser.add_argument("--keep-loaded", action="store_true", help=keep_loaded)
    parser.add_argument("--cpu-matmul", choices=CPU_MATMULS, default="auto",
                        help="MLX side on the CPU: how the vision encoder, DiT and VAE multiply (as the CLI's "
                             "--cpu-matmul; auto: bf16 where the CPU has AVX512-BF16).")


def add_profile(parser: argparse.ArgumentParser, what: str) -> None:
    """``--profile`` (``what`` it profiles, per call, with ``benchmarks.profiler``) and ``--profile-repeats``."""
    parser.add_argument("--profile", action="store_true", help=f"Also profile {what} (MLX).")
    parser.add_argument("--profile-repeats", type=int, default=3,
                        help="Plain (unprofiled) runs of each profiled stage; the best is shown (default 3).")


def add_cost_model(parser: argparse.ArgumentParser) -> None:
    from benchmarks.cost_model import BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY

    parser.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY,
                        help=f"Fraction of a GPU's peak FLOP/s the cost model assumes (default {COMPUTE_EFFICIENCY}).")
    parser.add_argument("--bandwidth-efficiency", type=float, default=BANDWIDTH_EFFICIENCY,
                        help=f"Fraction of a GPU's peak bandwidth assumed (default {BANDWIDTH_EFFICIENCY}).")


def add_cache_and_json(parser: argparse.ArgumentParser, json_help: str = "every measurement") -> None:
    parser.add_argument("--rebuild", action="store_true", help="Rewrite the cached checkpoint and conversions.")
    parser.add_argument("--json", default=None, help=f"Also write {json_help} to this file.")


def add_worker(parser: argparse.ArgumentParser, *names: str) -> None:
    """The hidden options only a worker is given: ``--worker SIDE`` and ``names`` (e.g. folder)."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for name in names:
        parser.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)


def forward(args: argparse.Namespace, names: tuple[str, ...], **given) -> list[str]:
    """The worker's arguments: the options ``names`` (attribute names) of the parent's ``args`` and
    the ``given`` ones, each as ``--name value``, a set flag as ``--name``, an unset one or None left out."""
    argv = []
    for name, value in {**{name: getattr(args, name) for name in names}, **given}.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def pick(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated choice (``--sides mlx,torch-fp32``), each checked against ``allowed``."""
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    for item in chosen:
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return chosen


def warmup(args: argparse.Namespace, default: bool) -> bool:
    """``--warmup on|off``, or ``default`` (on GPUs: compiling kernels there is not the model's time)."""
    return {"on": True, "off": False}.get(args.warmup, default)


def main(parser: argparse.ArgumentParser, parent: Callable[[argparse.Namespace], int],
         workers: dict[str, Callable[[argparse.Namespace], dict]], argv=None) -> int:
    """Run the parent, or with ``--worker SIDE`` that side's worker (its result: one JSON line)."""
    args = parser.parse_args(argv)
    if args.worker is None:
        measure.set_threads(getattr(args, "threads", None))
        return parent(args)
    measure.emit(workers[args.worker](args))
    return 0
