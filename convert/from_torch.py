"""Convert an original Mobile-O checkpoint into an MLX model folder.

    python -m convert.from_torch CHECKPOINT --output DIR [--quantize mixed] [--group-size 64] [--force]

CHECKPOINT is a local folder in the released layout (the repo root or its
``final_merged_model_23620/`` subfolder; ``model.safetensors``, sharded
safetensors with an index, or ``pytorch_model.bin``), or a hub id such as
``Amshaker/Mobile-O-0.5B`` (only the needed files are downloaded).

The output folder holds ``config.json`` (every component's config, the
quantized layers, the source), ``<component>.safetensors`` for vision,
projector, language, mcp, dit and vae (MLX layouts; the VAE encoder and the
vision head are left out), ``tokenizer.json`` (built from vocab.json +
merges.txt when the checkpoint has no fast tokenizer), the other tokenizer
files and a model card. It is written to a temporary folder beside DIR and
renamed at the end, so a failed or interrupted run leaves nothing behind (a
killed one leaves a temporary folder, removed by the next run). ``--force``
replaces DIR only if it is empty or an earlier conversion holding nothing but
the converter's files: a user's files are never deleted.

Conversion streams one tensor at a time: the full 3.3 GB checkpoint converts
in well under 2.5 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mlx.utils import tree_flatten

from mobileo_mlx._version import __version__
from mobileo_mlx.convert.checkpoint import (
    Checkpoint,
    ConversionError,
    MissingTensor,
    PlannedTensor,
    SafetensorsWriter,
    build_fast_tokenizer,
    resolve_diffusion_configs,
)
from mobileo_mlx.convert.mapping import load_component as load_mapping
from mobileo_mlx.convert.mapping import map_name
from mobileo_mlx.convert.download import download_checkpoint
from mobileo_mlx.convert.layout import TOKENIZER_FILES, looks_like_hub_id
from mobileo_mlx.convert.quantize import DEFAULT_GROUP_SIZE, DEFAULT_RECIPE, GROUP_SIZES, RECIPES, plan_layers, quantize_rows
from mobileo_mlx.errors import WeightsError
from mobileo_mlx.models import build
from mobileo_mlx.platform import remove_stale_temporaries
from mobileo_mlx.weights import COMPONENTS, FORMAT, FORMAT_VERSION, check_folder, config_problem, is_converted_folder

# Component -> (what it is, where its tensors live in the checkpoint), for messages.
COMPONENT_SOURCES = {
    "vision": ("FastViTHD vision tower", "model.vision_tower.vision_tower.model.*"),
    "projector": ("multimodal projector", "model.mm_projector.*"),
    "language": ("Qwen2 language model", "model.embed_tokens / model.layers.* / model.norm"),
    "mcp": ("Mobile Conditioning Projector", "model.diffusion_connector.fusion.*"),
    "dit": ("SANA DiT", "model.dit.*"),
    "vae": ("DC-AE decoder", "model.vae.decoder.*"),
}
STALE_PREFIX = "base_model."  # PEFT duplicates merge_lora leaves in the root file (docs/reference-model.md §1.1)

LICENCE_NOTE = (
    "Converted weights of Mobile-O (Amshaker/Mobile-O-0.5B); they remain under the licence "
    "terms of the original checkpoint and of the models it is built from (Qwen2, FastViT/MobileCLIP, "
    "SANA, DC-AE). See the original model card."
)


# ---------------------------------------------------------------------------
# planning


@dataclass
class ComponentPlan:
    """Everything needed to write one component, decided before any tensor is read."""

    name: str
    source_names: list[str]
    config: dict
    expected: dict[str, tuple[int, ...]]  # runtime parameter -> shape (unquantized model)
    layers: dict[str, dict]  # quantized module path -> {"bits", "group_size"}
    storage_dtype: str  # "BF16" | "F16" | "F32"
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def scales_dtype(self) -> str:
        return "F32" if self.storage_dtype == "F32" else "F16"

    def quantized_as(self, runtime_name: str) -> dict | None:
        module, _, leaf = runtime_name.rpartition(".")
        return self.layers.get(module) if leaf == "weight" else None


def _assign_tensors(checkpoint: Checkpoint) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Checkpoint names per component, plus counts of what is left out."""
    owned: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    counts = {"stale base_model.* duplicates": 0, "unused (VAE encoder, vision head, ...)": 0, "unknown": 0}
    mappings = {c: load_mapping(c) for c in COMPONENTS}
    for name in checkpoint.tensors:
        if name.startswith(STALE_PREFIX):
            counts["stale base_model.* duplicates"] += 1
            continue
        claimed = False
        for component, mapping in mappings.items():
            if mapping.KEYS.match(name):
                claimed = True
                if mapping.IGNORE is not None and mapping.IGNORE.match(name):
                    counts["unused (VAE encoder, vision head, ...)"] += 1
                else:
                    owned[component].append(name)
                break
        if not claimed:
            counts["unknown"] += 1
    return owned, counts


def _missing_tensor_message(component: str, name: str) -> str:
    return f"missing tensor {name} (needed by the {COMPONENT_SOURCES[component][0]})"


def plan_component(
    checkpoint: Checkpoint,
    component: str,
    names: list[str],
    diffusers_configs: dict,
    recipe: str,
    group_size: int,
) -> ComponentPlan:
    mapping = load_mapping(component)
    shapes = checkpoint.shapes(names)
    try:
        config = mapping.config_from_checkpoint(shapes, checkpoint.config, diffusers_configs)
    except KeyError as error:
        key = error.args[0] if error.args else ""
        if isinstance(key, str) and "." in key:
            raise ConversionError(_missing_tensor_message(component, key)) from None
        raise ConversionError(f"{component}: cannot derive its config: missing {key!r}") from None
    except ValueError as error:
        raise ConversionError(f"{component}: {error}") from None
    except (TypeError, AttributeError, IndexError, ArithmeticError) as error:  # a value of the wrong kind
        raise ConversionError(f"{component}: cannot derive its config: {type(error).__name__}: {error}") from None
    problem = config_problem(component, config)
    if problem:
        raise ConversionError(f"{problem} (from the checkpoint's configs)")
    try:
        model = build(component, config)
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as error:
        raise ConversionError(f"{component}: cannot build the MLX model from its config: {error}") from None
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    layers = plan_layers(component, model, recipe, group_size)
    del model
    plan = ComponentPlan(component, names, config, expected, layers, checkpoint.float_dtype(names))
    for name, shape in expected.items():
        spec = plan.quantized_as(name)
        if spec is None:
            plan.tensors.append(PlannedTensor(name, plan.storage_dtype, shape))
            continue
        base = name[: -len("weight")]
        bits, group = spec["bits"], spec["group_size"]
        groups = shape[:-1] + (shape[-1] // group,)
        plan.tensors.append(PlannedTensor(name, "U32", shape[:-1] + (shape[-1] * bits // 32,)))
        plan.tensors.append(PlannedTensor(base + "scales", plan.scales_dtype, groups))
        plan.tensors.append(PlannedTensor(base + "biases", plan.scales_dtype, groups))
    return plan


# ---------------------------------------------------------------------------
# writing


def _source_name_guess(plan: ComponentPlan, runtime_name: str, reverse: dict[str, str]) -> str:
    """The checkpoint name a missing runtime tensor would come from, by analogy
    with a present tensor whose runtime name differs only in its numbers (a
    layer index): those numbers are substituted in the analogue's checkpoint
    name where they occur exactly once."""
    digits = re.compile(r"\d+")
    pattern = digits.sub("#", runtime_name)
    wanted = digits.findall(runtime_name)
    for runtime, source in reverse.items():
        if digits.sub("#", runtime) != pattern:
            continue
        tokens = digits.split(source)
        numbers = digits.findall(source)
        changes = {have: want for have, want in zip(digits.findall(runtime), wanted) if have != want}
        if any(numbers.count(have) != 1 for have in changes):
            continue
        numbers = [changes.get(n, n) for n in numbers]
        return "".join(t + (numbers[i] if i < len(numbers) else "") for i, t in enumerate(tokens))
    return f"{plan.name} {runtime_name}"


def write_component(checkpoint: Checkpoint, plan: ComponentPlan, path: Path, progress: bool) -> None:
    """Stream ``plan``'s tensors from the checkpoint into ``path``."""
    from tqdm import tqdm

    mapping = load_mapping(plan.name)
    rules = getattr(mapping, "RULES", ())
    reverse = {}
    for name in plan.source_names:
        mapped = map_name(rules, name)
        if mapped is not None:
            reverse[mapped[0]] = name

    def get(name: str):
        try:
            return checkpoint.get(name)
        except MissingTensor:
            raise ConversionError(_missing_tensor_message(plan.name, name)) from None

    writer = SafetensorsWriter(path, plan.tensors, {"format": "mlx", "component": plan.name})
    bar = tqdm(
        total=len(plan.expected), desc=f"{plan.name:>9}", unit="tensor", file=sys.stderr, disable=not progress,
        leave=True, dynamic_ncols=True,
    )
    seen: set[str] = set()
    try:
        stream = iter(mapping.convert(plan.source_names, get, plan.config))
        while True:
            try:
                item = next(stream)
            except StopIteration:
                break
            except (ValueError, KeyError) as error:
                if isinstance(error, KeyError) and isinstance(error.args[0] if error.args else None, str):
                    key = error.args[0]
                    if key in checkpoint.tensors or "." not in key:
                        raise ConversionError(f"{plan.name}: {key}") from None
                    raise ConversionError(_missing_tensor_message(plan.name, key)) from None
                raise ConversionError(f"{plan.name}: {error}") from None
            name, values = item
            del item  # keep one tensor alive at a time
            source = reverse.get(name, f"{plan.name} {name}")
            if name not in plan.expected:
                raise ConversionError(
                    f"{plan.name}: the checkpoint tensor {source} maps to {name}, which the MLX model does not have"
                )
            if name in seen:
                raise ConversionError(f"{plan.name}: {name} was produced twice (from {source})")
            expected = plan.expected[name]
            if tuple(values.shape) != expected:
                raise ConversionError(
                    f"shape mismatch for {source}: the model expects {list(expected)} (MLX layout), "
                    f"the checkpoint gives {list(values.shape)}"
                )
            spec = plan.quantized_as(name)
            if spec is None:
                writer.write(name, values)
            else:
                base = name[: -len("weight")]
                for first, packed, scales, biases in quantize_rows(values, spec["bits"], spec["group_size"]):
                    last = first + packed.shape[0] == values.shape[0]
                    writer.write_rows(name, first, packed, last)
                    writer.write_rows(base + "scales", first, scales, last)
                    writer.write_rows(base + "biases", first, biases, last)
            del values
            seen.add(name)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    missing = sorted(set(plan.expected) - seen)
    if missing:
        guesses = [_source_name_guess(plan, name, reverse) for name in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"missing tensors for the {COMPONENT_SOURCES[plan.name][0]}: {', '.join(guesses)}{more}")


def write_tokenizer(checkpoint: Checkpoint, folder: Path) -> list[str]:
    """Copy the tokenizer files; build tokenizer.json when there is none."""
    source = checkpoint.tokenizer_folder()
    copied = []
    for filename in TOKENIZER_FILES:
        if (source / filename).is_file():
            shutil.copyfile(source / filename, folder / filename)
            copied.append(filename)
    if "tokenizer.json" not in copied:
        build_fast_tokenizer(source).save(str(folder / "tokenizer.json"))
    return copied


def _model_card(config: dict, sizes: dict[str, int]) -> str:
    quantization = config["quantization"]
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, mobile-o, text-to-image, image-editing, vision-language]",
        "---",
        "",
        "# Mobile-O for MLX",
        "",
        f"Converted from `{config['source']['checkpoint']}` with mobileo-mlx {__version__} "
        f"(`python -m convert.from_torch`), quantization recipe `{quantization['recipe']}`"
        + (f" (group size {quantization['group_size']})." if quantization["recipe"] != "none" else "."),
        "",
        "| component | file | size | quantized layers |",
        "|---|---|---|---|",
    ]
    for component in COMPONENTS:
        count = len(quantization["layers"].get(component, {}))
        lines.append(f"| {component} | `{component}.safetensors` | {sizes[component] / 2**20:.1f} MiB | {count} |")
    lines += [
        "",
        "Load it with `mobileo_mlx.load(\"<this folder>\")` or `mobileo-mlx generate --model <this folder> ...`.",
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the whole conversion


# What the converter writes into its output folder: nothing else may be in a folder --force replaces.
OUTPUT_FILES = frozenset({"config.json", "README.md", *(f"{c}.safetensors" for c in COMPONENTS), *TOKENIZER_FILES})


def _replace_problem(output: Path) -> str | None:
    """Why --force may not replace the existing folder ``output``, or None: it may replace an
    empty folder, or one the converter wrote (the format mark in its config.json) that holds
    nothing but the converter's files. A user's files are never deleted."""
    try:
        names = sorted(p.name for p in output.iterdir())
    except OSError as error:
        return f"cannot read the output folder {output}: {error.strerror or error}"
    if not names:
        return None
    if not is_converted_folder(output):
        return (
            f"--force replaces only an empty folder or an earlier conversion, and {output} is neither "
            f"(no config.json with \"format\": \"{FORMAT}\"): choose another --output, or empty it yourself"
        )
    foreign = [name for name in names if name not in OUTPUT_FILES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (
            f"--force would delete files the converter did not write in {output} ({shown}): "
            "move them out or choose another --output"
        )
    return None


def _check_output(output: Path, checkpoint_path: Path | None, force: bool, cache_entry: bool = False) -> None:
    if checkpoint_path is not None and checkpoint_path.exists():
        source = checkpoint_path.resolve()
        target = output.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ConversionError(f"the output {output} must lie outside the checkpoint {checkpoint_path}")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output exists and is not a folder: {output}")
    if output.exists() and not force:
        raise ConversionError(f"output exists: {output} (pass --force to replace it)")
    if output.exists() and not cache_entry:
        problem = _replace_problem(output)
        if problem:
            raise ConversionError(problem)


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    quantize: str = DEFAULT_RECIPE,
    group_size: int = DEFAULT_GROUP_SIZE,
    force: bool = False,
    diffusion_config: str | os.PathLike | None = None,
    progress: bool = True,
    source_label: str | None = None,
    cache_entry: bool = False,
) -> Path:
    """Convert ``checkpoint`` (a local path) into the MLX folder ``output``; returns ``output``.

    Raises :class:`ConversionError` (one line) for every problem with the input
    or the output; never leaves a partial output folder. ``force`` replaces an
    existing ``output`` only if it is empty or an earlier conversion; a
    ``cache_entry`` (a folder of the model cache, which the caller owns) is
    replaced whatever it holds.
    """
    if quantize not in RECIPES:
        raise ConversionError(f"unknown --quantize {quantize!r}; choose from {', '.join(RECIPES)}")
    if group_size not in GROUP_SIZES:
        raise ConversionError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
    checkpoint_path = Path(checkpoint).expanduser()
    output = Path(output).expanduser()
    _check_output(output, checkpoint_path, force, cache_entry)

    source = Checkpoint(checkpoint_path)
    diffusers_configs, config_sources = resolve_diffusion_configs(source, diffusion_config)
    problem = config_problem("scheduler", diffusers_configs["scheduler"])
    if problem:
        raise ConversionError(f"{problem} (from {config_sources['scheduler']})")

    owned, left_out = _assign_tensors(source)
    absent = [c for c in COMPONENTS if not owned[c]]
    if absent:
        what = "; ".join(f"{COMPONENT_SOURCES[c][0]} ({COMPONENT_SOURCES[c][1]})" for c in absent)
        raise ConversionError(f"not a Mobile-O checkpoint: no tensors for the {what}")
    plans = {
        c: plan_component(source, c, owned[c], diffusers_configs, quantize, group_size) for c in COMPONENTS
    }

    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(output)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as error:
        raise ConversionError(f"cannot write into {output.parent}: {error.strerror or error}") from None
    try:
        sizes = {}
        for component, plan in plans.items():
            path = staging / f"{component}.safetensors"
            write_component(source, plan, path, progress)
            sizes[component] = path.stat().st_size
        tokenizer_files = write_tokenizer(source, staging)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": "mobileo",
            "converter": f"mobileo-mlx {__version__}",
            **{c: plans[c].config for c in COMPONENTS},
            "scheduler": diffusers_configs["scheduler"],
            "quantization": {
                "recipe": quantize,
                "group_size": group_size if quantize != "none" else None,
                "layers": {c: plans[c].layers for c in COMPONENTS if plans[c].layers},
            },
            "source": {
                "checkpoint": source_label or str(checkpoint_path),
                "path": str(checkpoint_path.resolve()),  # where to convert it from again
                "weights": [str(p.relative_to(source.root)) for p in source.weight_files],
                "dtype": {c: plans[c].storage_dtype for c in COMPONENTS},
                "configs": config_sources,
                "tokenizer_files": tokenizer_files,
                "left_out": {k: v for k, v in left_out.items() if v},
                "checkpoint_config": source.config,
            },
            "licence": LICENCE_NOTE,
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(_model_card(config, sizes))
        try:  # what loading will check: never put a folder in place that would fail it
            check_folder(staging)
        except WeightsError as error:
            raise ConversionError(f"internal: the converted folder fails validation: {error}") from None
        _replace(staging, output, force, cache_entry)
    except OSError as error:  # a full disk, a folder made read-only meanwhile, ...
        shutil.rmtree(staging, ignore_errors=True)
        where = f" ({error.filename})" if error.filename else ""
        raise ConversionError(f"writing {output} failed: {error.strerror or error}{where}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _remove_stale_staging(output: Path) -> None:
    """Remove what runs killed outright (SIGKILL, power loss) left beside ``output``: its
    ``.NAME.partial-PID`` and ``.NAME.old-PID`` folders whose process is gone."""
    remove_stale_temporaries(output.parent, name=f".{output.name}")


def _replace(staging: Path, output: Path, force: bool, cache_entry: bool) -> None:
    """Move the finished folder into place (replacing ``output`` under --force)."""
    if not output.exists():
        os.replace(staging, output)
        return
    # Checked again: the folder may have appeared or changed while the conversion ran.
    if not cache_entry:
        problem = _replace_problem(output) if force else f"output exists: {output} (pass --force to replace it)"
        if problem:
            raise ConversionError(problem)
    retired = output.parent / f".{output.name}.old-{os.getpid()}"
    os.replace(output, retired)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(retired, output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def upload_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Push a converted folder to the hub (create_repo + upload_folder); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=f"Upload Mobile-O converted with mobileo-mlx {__version__}",
        )
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"upload to {repo_id} failed: {reason}") from None
    return str(url)


# ---------------------------------------------------------------------------
# command line


def build_parser(prog: str = "python -m convert.from_torch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Mobile-O checkpoint (PyTorch / safetensors) into an MLX model folder.",
        epilog=(
            "Quantization recipes: none keeps the source float dtype (bf16 stays bf16, fp32 stays fp32); "
            "8 / 4 quantize every Linear and Embedding except the MCP; mixed (recommended, 1.5 GiB) "
            "puts the LM's decoder linears at 4 bits, its embedding and head at 8 bits, the DiT blocks' "
            "and the VAE's linears at 8 bits, and keeps the vision tower, projector, MCP, norms and small "
            "projections at source precision. See convert/quantize.py."
        ),
    )
    parser.add_argument(
        "checkpoint",
        help="A local Mobile-O checkpoint (the repo root, its final_merged_model_23620/ subfolder or a weights "
        "file) or a hub id such as Amshaker/Mobile-O-0.5B (only the needed files are downloaded).",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="The MLX folder to write (required).")
    parser.add_argument(
        "--quantize", choices=RECIPES, default=DEFAULT_RECIPE,
        help=f"Quantization recipe: {', '.join(RECIPES)} (default: {DEFAULT_RECIPE}).",
    )
    parser.add_argument(
        "--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
        help=f"Values per quantization group (default: {DEFAULT_GROUP_SIZE}).",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="Replace the output folder if it is an earlier conversion or empty; a folder with other files is "
        "never replaced (default: refuse any existing folder).",
    )
    parser.add_argument(
        "--diffusion-config", type=Path, default=None, metavar="DIR",
        help="A folder with the diffusers configs (transformer/config.json, vae/config.json, "
        "scheduler/scheduler_config.json), used when the checkpoint folder lacks them (default: the repo named by "
        "diffusion_name_or_path, then built-in Sana_600M_512px_diffusers values).",
    )
    parser.add_argument(
        "--upload-repo", default=None, metavar="NAME",
        help="After converting, push the output folder to this hub repo (default: no upload).",
    )
    parser.add_argument("--private", action="store_true", help="Create the --upload-repo repo as private (default: public).")
    parser.add_argument("--quiet", "-q", action="store_true", help="No progress bars (default: one bar per component on stderr).")
    return parser


def main(argv: Iterable[str] | None = None, prog: str = "python -m convert.from_torch") -> int:
    """The converter's command line (``python -m convert.from_torch`` in a checkout,
    ``mobileo-mlx convert`` and ``python -m mobileo_mlx.convert`` anywhere); returns the exit status."""
    args = build_parser(prog).parse_args(None if argv is None else list(argv))
    debug = bool(os.environ.get("MOBILEO_MLX_DEBUG"))
    started = time.perf_counter()
    previous_handler = _stop_on_sigterm()
    try:
        checkpoint = Path(args.checkpoint).expanduser()
        label = None
        if not checkpoint.exists() and looks_like_hub_id(args.checkpoint):
            _check_output(args.output.expanduser(), None, args.force)
            label = args.checkpoint
            checkpoint = download_checkpoint(args.checkpoint, progress=not args.quiet)
        output = convert_checkpoint(
            checkpoint,
            args.output,
            quantize=args.quantize,
            group_size=args.group_size,
            force=args.force,
            diffusion_config=args.diffusion_config,
            progress=not args.quiet,
            source_label=label,
        )
        total = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
        print(f"wrote {output} ({total / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s")
        if args.upload_repo:
            url = upload_folder(output, args.upload_repo, private=args.private)
            print(f"uploaded to {url}")
        return 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if debug:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"error: unexpected {type(error).__name__}: {reason} (set MOBILEO_MLX_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _stop_on_sigterm():
    """Make SIGTERM unwind like Ctrl-C (so the temporary folder is removed);
    returns the previous handler, or None off the main thread."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
