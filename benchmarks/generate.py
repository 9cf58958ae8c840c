"""One 512x512 text-to-image generation with CFG, in MLX and in PyTorch, with the same weights.

    python -m benchmarks.generate [--recipe none|mixed|8|4] [--steps 20] [--sides mlx,torch-fp32,torch-bf16]
                                  [--profile] [--json results.json]

The first run writes a full-size random checkpoint in the released layout
(``<cache>/bench/checkpoint-full``, 3.3 GB, ~1 min) and converts it with the chosen recipe
(``<cache>/bench/mlx-<recipe>``); later runs reuse both. Then every side runs in its own process:

* ``mlx``        the mobileo-mlx pipeline (``MobileO.conditioning`` / ``generate_latents`` /
                 ``decode``) in the backend's compute dtype (fp32 on CPU, fp16 on GPUs);
* ``torch-fp32`` the same work on the PyTorch references (transformers' Qwen2, the test-side MCP,
                 diffusers' SanaTransformer2DModel, DPMSolverMultistepScheduler, AutoencoderDC),
                 built from the same checkpoint, in float32;
* ``torch-bf16`` the same in bfloat16 (DiT, LM, MCP, VAE; scheduler in fp32), as the original
                 inference script runs it.

PyTorch runs on CUDA when available, else on the CPU; MLX on its default device. Same prompt, same
seeded NCHW noise: the two fp32 images must agree (max |delta| printed) when the recipe is ``none``.

Printed: a table per stage (LLM + MCP, one DiT step, all steps, VAE decode, total) with seconds per
side and the PyTorch/MLX ratio, MLX peak memory per stage, peak RSS per process, the DiT's achieved
GFLOP/s beside the n^3 matmul GFLOP/s measured in the same process, and a cost model (FLOPs and
bytes per stage, the time it predicts on Apple-silicon GPUs). ``--profile`` adds a per-op
breakdown of one DiT step and of the VAE decode (MLX). ``--steps N < 20`` extrapolates the
20-step figures from the measured steps, and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import common
from benchmarks.common import log

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by common)
import numpy as np  # noqa: E402

SIDES = ("mlx", "torch-fp32", "torch-bf16")
REFERENCE_STEPS = 20


# ----------------------------------------------------------------------------------------------
# workers


def mlx_worker(args) -> dict:
    from mobileo_mlx import platform, processing
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    load_s = 0.0

    def load(*names: str) -> None:  # loading is timed apart from the stages
        nonlocal load_s
        started = time.perf_counter()
        for name in names:
            model.component(name)
        load_s += time.perf_counter() - started

    # As `mobileo-mlx generate`: each component loaded when its stage comes (the LLM and MCP
    # freed after conditioning, the DiT before decoding); --keep-loaded loads all up front.
    load(*(("language", "mcp", "dit", "vae") if args.keep_loaded else ("language", "mcp")))
    rss_loaded = common.rss_gb()
    matmul = common.mlx_matmul_gflops()
    copy = common.mlx_copy_gbps()
    prompt = model._caption_prompt(processing.generation_prompt, args.prompt)
    noise = common.noise(model.config, args.size)
    if _warmup(args, platform.backend() != "cpu"):
        warm = model.conditioning(prompt)
        for step in model.generate_latents(warm, steps=2, guidance=args.guidance, noise=noise, size=args.size):
            pass
        model.decode(step.latents)
    peaks = {}

    common.mlx_reset_peak()
    t0 = time.perf_counter()
    conditioning = model.conditioning(prompt)
    llm_s = time.perf_counter() - t0
    peaks["llm_mcp"] = common.mlx_peak_gb()
    if not args.keep_loaded:
        model.release(*model.CONDITIONING_COMPONENTS)
    load("dit")

    common.mlx_reset_peak()
    step_s = []
    last = time.perf_counter()
    for step in model.generate_latents(conditioning, steps=args.steps, guidance=args.guidance, noise=noise,
                                       size=args.size):
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
    peaks["dit"] = common.mlx_peak_gb()
    if not args.keep_loaded:
        model.release("dit")
    load("vae")

    common.mlx_reset_peak()
    t0 = time.perf_counter()
    image = model.decode(step.latents)[0]
    decode_s = time.perf_counter() - t0
    peaks["vae"] = common.mlx_peak_gb()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "mlx.png")
    latents = np.array(step.latents.astype(mx.float32)).transpose(0, 3, 1, 2)  # NCHW like torch
    np.save(out / "mlx-latents.npy", latents)
    return {
        "side": "mlx", "dtype": str(model.dtype).split(".")[-1] + (
            ", bf16 CPU matmuls" if model.cpu_matmul == "bf16" and platform.backend() == "cpu" else ""), "device": platform.device_name(),
        "backend": platform.backend(), "load_s": load_s, "llm_mcp_s": llm_s, "step_s": step_s,
        "decode_s": decode_s, "prompt_tokens": conditioning.prompt_tokens, "mlx_peak_gb": peaks,
        "rss_loaded_gb": rss_loaded, "peak_rss_gb": common.peak_rss_gb(), "matmul_gflops": matmul,
        "copy_gbps": copy, "image": str(out / "mlx.png"), "latents": str(out / "mlx-latents.npy"),
        "load": common.load_average(),
    }


def _warmup(args, default: bool) -> bool:
    return {"on": True, "off": False}.get(args.warmup, default)


def torch_embeddings(ref, text: str, torch, device, image=None):
    """``ReferenceMobileO.embeddings`` with the token ids on ``device`` (CUDA-safe)."""
    ids = ref.token_ids(text)
    embed = ref.lm.get_input_embeddings()
    pieces, chunk = [], []
    for token in ids + [None]:
        if token is None or token == -200:
            if chunk:
                pieces.append(embed(torch.tensor(chunk, device=device)))
                chunk = []
            if token == -200:
                pixels = ref.pixels(image).to(device=device, dtype=embed.weight.dtype)
                pieces.append(ref.projector(ref.vision(pixels))[0])
        else:
            chunk.append(token)
    return torch.cat(pieces)[None]


def torch_worker(args) -> dict:
    torch, device = common.torch_setup()
    torch.set_grad_enabled(False)
    from tests.reference.pipeline_torch import template

    from mobileo_mlx import processing

    dtype = torch.float32 if args.worker == "torch-fp32" else torch.bfloat16
    started = time.perf_counter()
    ref = common.build_torch(Path(args.checkpoint), ("vae", "lm", "mcp", "dit"), dtype, device)
    load_s = time.perf_counter() - started
    rss_loaded = common.rss_gb()
    matmul = common.torch_matmul_gflops(torch, device, dtype)
    noise = common.noise({"vae": {"block_out_channels": ref.vae.config.decoder_block_out_channels,
                                  "latent_channels": ref.vae.config.latent_channels}}, args.size)
    message = processing.GENERATION_TEMPLATE.format(prompt=args.prompt)

    def condition():
        embeds = torch_embeddings(ref, template(message), torch, device)
        hidden = ref.lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        last = list(hidden[-ref.mcp.layer_weights.shape[0]:])
        cond = ref.mcp(last)
        uncond = ref.mcp([torch.zeros_like(h) for h in last])
        return torch.cat([uncond, cond]).to(dtype), embeds.shape[1]

    def denoise(context, steps, record=None):
        scheduler = ref.scheduler_cls.from_config(ref.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = torch.from_numpy(noise).to(device)
        last = time.perf_counter()
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]).to(dtype)
            velocity = ref.dit(model_input, encoder_hidden_states=context, timestep=t.expand(2).to(device),
                               encoder_attention_mask=None, return_dict=False)[0].float()
            v_uncond, v_cond = velocity.chunk(2)
            latents = scheduler.step(v_uncond + args.guidance * (v_cond - v_uncond), t, latents).prev_sample
            common.torch_sync(torch, device)
            if record is not None:
                now = time.perf_counter()
                record.append(now - last)
                last = now
        return latents

    def decode(latents):
        scaled = (latents / ref.vae.config.scaling_factor).to(dtype)
        decoded = ref.vae.decode(scaled, return_dict=False)[0]
        image01 = (decoded.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        return (image01 * 255).round().astype(np.uint8)

    if _warmup(args, device.type == "cuda"):
        decode(denoise(condition()[0], 2))
        common.torch_sync(torch, device)

    t0 = time.perf_counter()
    context, prompt_tokens = condition()
    common.torch_sync(torch, device)
    llm_s = time.perf_counter() - t0
    step_s: list[float] = []
    latents = denoise(context, args.steps, step_s)
    t0 = time.perf_counter()
    pixels = decode(latents)
    common.torch_sync(torch, device)
    decode_s = time.perf_counter() - t0

    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out / f"{args.worker}.png")
    np.save(out / f"{args.worker}-latents.npy", latents.float().cpu().numpy())
    return {
        "side": args.worker, "dtype": str(dtype).split(".")[-1], "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_s": load_s, "llm_mcp_s": llm_s,
        "step_s": step_s, "decode_s": decode_s, "prompt_tokens": prompt_tokens,
        "cuda_peak_gb": common.torch_peak_gb(torch, device), "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": common.peak_rss_gb(), "matmul_gflops": matmul, "image": str(out / f"{args.worker}.png"),
        "latents": str(out / f"{args.worker}-latents.npy"), "load": common.load_average(),
    }


# ----------------------------------------------------------------------------------------------
# profile (MLX): per-op time of one CFG DiT step and of the VAE decode


class OpProfiler:
    """Exclusive time per module call and per function of the model code.

    Every module class in the model tree and every function of the model's Python modules
    (``mobileo_mlx.models.sana`` / ``dcae``, the CPU backend's forms and activations) is wrapped: a wrapped
    call evaluates its inputs first (work charged to its caller), then runs and evaluates its
    output under the clock. Each entry is charged its time minus the time of the wrapped calls
    inside it, so a block's own row is the glue it computes inline (norms, residuals, reshapes).
    Evaluating every call separately disables MLX's lazy fusion: the profiled total is shown
    beside the plain one."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.paths: dict[int, str] = {}
        self._children: list[float] = []
        self._modules: list[str] = []  # enclosing module paths, innermost last
        self._restore: list = []

    def name_modules(self, model, prefix: str) -> None:
        import re

        for path, module in model.named_modules():
            name = f"{prefix}.{path}" if path else prefix
            name = re.sub(r"(?<!up_)blocks\.\d+\.", "blocks.*.", name)  # DiT blocks: one row per layer kind
            name = re.sub(r"(?<!up_)blocks\.\d+$", "blocks.*", name)
            name = re.sub(r"up_blocks\.(\d+)\.\d+", r"up_blocks.\1.*", name)  # VAE: one row per stage
            self.paths[id(module)] = f"{name} [{type(module).__name__}]"

    def _wrap(self, fn, label_of, is_module: bool):
        profiler = self

        def wrapper(*args, **kwargs):
            pending = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (mx.array, tuple, list))]
            mx.eval(pending)
            label = label_of(args)
            if not is_module and profiler._modules:  # a function: named after the module calling it
                label = f"{profiler._modules[-1].split(' [')[0]}: {label}"
            profiler._children.append(0.0)
            if is_module:
                profiler._modules.append(label)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                mx.eval(out)
            finally:
                total = time.perf_counter() - start
                inner = profiler._children.pop()
                if is_module:
                    profiler._modules.pop()
                profiler.seconds[label] += total - inner
                profiler.calls[label] += 1
                if profiler._children:
                    profiler._children[-1] += total
            return out

        return wrapper

    def wrap_classes_of(self, model) -> None:
        classes = list(dict.fromkeys(type(module) for _, module in model.named_modules()))
        originals = {cls: cls.__call__ for cls in classes}  # resolved before any class is patched
        for cls in classes:
            self._restore.append((cls, "__call__", cls.__dict__.get("__call__")))
            cls.__call__ = self._wrap(originals[cls],
                                      lambda args: self.paths.get(id(args[0]), f"? [{type(args[0]).__name__}]"), True)

    def wrap_functions_of(self, module) -> None:
        import inspect

        for name, value in list(vars(module).items()):
            if name.startswith("__") or inspect.isclass(value) or inspect.ismodule(value) or not callable(value):
                continue
            if inspect.isfunction(value) and value.__module__ != module.__name__:
                continue  # imported helpers (dataclass, ...) stay as they are
            if not inspect.isfunction(value) and type(value).__name__ not in ("nb_func", "function", "builtin_function_or_method"):
                continue
            self.wrap_function(module, name, f"{module.__name__.split('.')[-1]}.{name}()")

    def wrap_function(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self._restore.append((owner, name, original))
        setattr(owner, name, self._wrap(original, lambda args: label, False))

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()


def _instrument(profiler: OpProfiler, model) -> None:
    import importlib

    profiler.wrap_classes_of(model)
    for name in ("mobileo_mlx.models.sana", "mobileo_mlx.models.dcae", "mobileo_mlx.backends.cpu.activations",
                 "mobileo_mlx.backends.cpu.layers", "mobileo_mlx.kernels.depthwise"):
        try:
            profiler.wrap_functions_of(importlib.import_module(name))
        except ImportError:
            continue
    profiler.wrap_function(mx.fast, "scaled_dot_product_attention", "mx.fast.scaled_dot_product_attention()")


def profile_worker(args) -> dict:
    from mobileo_mlx import processing
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    dit, vae = model.component("dit"), model.component("vae")
    conditioning = model.conditioning(model._caption_prompt(processing.generation_prompt, args.prompt))
    model.release("language", "mcp")
    noise = common.noise(model.config, args.size)
    latents = model.initial_latents(args.size, noise=noise).astype(model.dtype)
    context = mx.concatenate([conditioning.uncond, conditioning.cond]).astype(model.dtype)
    text = dit.encode_text(context)
    mx.eval(text)
    batch = mx.concatenate([latents, latents])

    def dit_step():
        return dit(batch, time=dit.embed_timestep(499.0), text=text)

    scaled = latents / float(model.config["vae"]["scaling_factor"])
    result = {"side": "mlx-profile", "load": common.load_average(), "size": args.size}
    for name, fn, module in (("dit", dit_step, dit), ("vae", lambda: vae(scaled), vae)):
        mx.eval(fn())  # warm-up
        plain = []
        for _ in range(args.profile_repeats):
            t0 = time.perf_counter()
            mx.eval(fn())
            plain.append(time.perf_counter() - t0)
        profiler = OpProfiler()
        profiler.name_modules(module, name)
        _instrument(profiler, module)
        try:
            t0 = time.perf_counter()
            mx.eval(fn())
            profiled = time.perf_counter() - t0
        finally:
            profiler.restore()
        result[name] = {"plain_s": min(plain), "plain_all_s": plain, "profiled_s": profiled,
                        "ops": dict(profiler.seconds), "calls": dict(profiler.calls)}
    result["load_after"] = common.load_average()
    return result


def print_profile(data: dict, config: dict | None = None, top: int = 16) -> str:
    lines = []
    for name in ("dit", "vae"):
        part = data[name]
        rows = sorted(part["ops"].items(), key=lambda kv: -kv[1])
        shown = rows[:top]
        rest = sum(s for _, s in rows[top:])
        unaccounted = part["profiled_s"] - sum(s for _, s in rows)
        table_rows = [[op, part["calls"].get(op, ""), common.fmt(s * 1e3, 0), common.fmt(100 * s / part["profiled_s"], 1)]
                      for op, s in shown]
        table_rows.append([f"({len(rows) - len(shown)} more rows)", "", common.fmt(rest * 1e3, 0),
                           common.fmt(100 * rest / part["profiled_s"], 1)])
        table_rows.append(["(outside any wrapped call)", "", common.fmt(unaccounted * 1e3, 0),
                           common.fmt(100 * unaccounted / part["profiled_s"], 1)])
        title = "one CFG DiT step (batch 2, t=499)" if name == "dit" else f"VAE decode (one {data.get('size', 512)}x{data.get('size', 512)} image)"
        plain_all = ", ".join(f"{s:.2f}" for s in part.get("plain_all_s", [part["plain_s"]]))
        lines.append(f"{title}: best {part['plain_s']:.2f} s as run ({plain_all}), {part['profiled_s']:.2f} s with "
                     f"every call evaluated separately (exclusive times; {data['load']})")
        lines.append(common.table(["call (module path [class] or function)", "calls", "ms", "% of profiled"],
                                  table_rows))
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the parent: run the sides, print the tables


def _stage_times(result: dict, target_steps: int) -> dict:
    steps = result["step_s"]
    median = statistics.median(steps)
    all_steps = sum(steps) + (target_steps - len(steps)) * median if len(steps) < target_steps else sum(steps)
    return {
        "llm_mcp": result["llm_mcp_s"], "step": median, "best_step": min(steps), "steps": all_steps, "vae": result["decode_s"],
        "total": result["llm_mcp_s"] + all_steps + result["decode_s"], "load": result["load_s"],
    }


def cost_model(folder: Path, config: dict, prompt_tokens: int, steps: int, size: int) -> tuple[list, dict]:
    """Stages with FLOPs and bytes as an Apple GPU runs them (fp16 activations and weights,
    quantized layers packed)."""
    cells = size // 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    tokens = cells * cells
    w = {c: common.weight_bytes(folder, c)["bytes"] for c in ("language", "mcp", "dit", "vae")}
    # Generation reads every LM layer, but only a few embedding rows and never the head.
    lm_layers = common.weight_bytes(folder, "language", exclude=("model.embed_tokens.", "lm_head."))["bytes"]
    mcp_values = common.weight_bytes(folder, "mcp")["tensors_values"]
    hidden = int(config["language"]["hidden_size"])
    llm_act = 2 * prompt_tokens * hidden * 2 * 12 * int(config["language"]["num_hidden_layers"])
    stages = [
        common.Stage("LLM + MCP (prefill, all hidden states)",
                     common.lm_flops(config["language"], prompt_tokens) + 2 * 2 * prompt_tokens * mcp_values,
                     lm_layers + w["mcp"] + llm_act),
        common.Stage("DiT step (CFG, batch 2)", common.dit_forward_flops(config["dit"], 2, tokens, prompt_tokens, True),
                     w["dit"] + common.dit_activation_bytes(config["dit"], 2, tokens, prompt_tokens), steps),
        common.Stage("VAE decode", common.vae_decode_flops(config["vae"], size),
                     w["vae"] + common.vae_activation_bytes(config["vae"], size)),
    ]
    return stages, w


def print_cost_model(stages, weights_bytes: dict, recipe: str, steps: int, measured: dict | None,
                     mlx_result: dict | None, compute_eff: float, bandwidth_eff: float) -> str:
    lines = [f"cost model (recipe {recipe}; weights as a GPU holds them: fp16, quantized layers packed; "
             f"activations fp16, every op's inputs and outputs counted once)"]
    rows = []
    for s in stages:
        rows.append([s.name + (f" x{s.repeat}" if s.repeat > 1 else ""), common.fmt(s.flops / 1e9, 1),
                     common.fmt(s.bytes / 1e9, 2), common.fmt(s.flops / max(s.bytes, 1), 0)])
    lines.append(common.table(["stage", "GFLOP (each)", "GB moved (each)", "FLOP/byte"], rows))
    lines.append("weights (GB): " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in weights_bytes.items()))
    lines.append("")
    lines.append(f"predicted seconds = max(FLOPs / ({compute_eff:.0%} x peak fp16 FLOP/s), "
                 f"bytes / ({bandwidth_eff:.0%} x peak bandwidth)) per stage")
    rows = []
    for name, cores, tflops, gbps in common.APPLE_GPUS:
        t = common.predict_seconds(stages, tflops, gbps, compute_eff, bandwidth_eff)
        rows.append([f"{name} ({cores}-core GPU)", common.fmt(tflops, 1), common.fmt(gbps, 0),
                     common.fmt(t[0], 2), common.fmt(t[1] / steps, 3), common.fmt(t[1], 1), common.fmt(t[2], 2),
                     common.fmt(sum(t), 1)])
    if mlx_result is not None:
        # This machine, from the rates measured in the MLX worker, at efficiency 1 (they are achieved rates).
        tflops, gbps = mlx_result["matmul_gflops"] / 1e3, mlx_result["copy_gbps"]
        t = common.predict_seconds(stages, tflops, gbps, 1.0, 1.0)
        rows.append([f"this machine ({mlx_result['backend']}, measured rates, eff. 1)", common.fmt(tflops, 3),
                     common.fmt(gbps, 0), common.fmt(t[0], 2), common.fmt(t[1] / steps, 3), common.fmt(t[1], 1),
                     common.fmt(t[2], 2), common.fmt(sum(t), 1)])
        if measured:
            rows.append(["this machine, measured (MLX)", "", "", common.fmt(measured["llm_mcp"], 2),
                         common.fmt(measured["step"], 3), common.fmt(measured["steps"], 1),
                         common.fmt(measured["vae"], 2), common.fmt(measured["total"], 1)])
    lines.append(common.table(["chip", "fp16 TFLOP/s", "GB/s", "LLM+MCP s", "DiT step s", f"{steps} steps s",
                               "VAE s", "total s"], rows))
    return "\n".join(lines)


def parent(args) -> int:
    checkpoint = common.full_checkpoint(args.rebuild)
    folder = common.converted(args.recipe, args.rebuild)
    config = json.loads((folder / "config.json").read_text())
    out = common.bench_dir() / "out" / f"generate-{args.recipe}"
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for side in sides:
        if side not in SIDES:
            raise SystemExit(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
    shared = ["--folder", str(folder), "--checkpoint", str(checkpoint), "--steps", str(args.steps),
              "--guidance", str(args.guidance), "--size", str(args.size), "--prompt", args.prompt,
              "--out", str(out), "--warmup", args.warmup, "--profile-repeats", str(args.profile_repeats),
              "--cpu-matmul", args.cpu_matmul] + (
        ["--keep-loaded"] if args.keep_loaded else [])
    print(f"machine: {json.dumps(common.machine())}")
    print(f"command: python -m benchmarks.generate {' '.join(sys.argv[1:])}"
          + (f"  (threads pinned to {args.threads})" if args.threads else ""))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    results = {side: common.run_worker("benchmarks.generate", side, shared) for side in sides}
    profile = common.run_worker("benchmarks.generate", "mlx-profile", shared) if args.profile else None

    target = max(args.steps, REFERENCE_STEPS) if args.extrapolate else args.steps
    times = {side: _stage_times(r, target) for side, r in results.items()}
    extrapolated = target != args.steps
    some = next(iter(results.values()))
    prompt_tokens = some["prompt_tokens"]
    cells = args.size // 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    step_flops = common.dit_forward_flops(config["dit"], 2, cells * cells, prompt_tokens)

    print()
    print(f"generate {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, recipe {args.recipe}, "
          f"prompt {prompt_tokens} tokens")
    for side, r in results.items():
        print(f"  {side}: {r['device']} {r['dtype']}, load {r['load_s']:.1f} s (not in the total), run at {r['load']}")
    headers = ["stage"]
    for side in sides:
        headers.append(f"{side} s")
        if side != "mlx" and "mlx" in times:
            headers.append(f"{side}/mlx")
    if "mlx" in results:
        headers.append("MLX peak GB")
    steps_label = f"all {target} steps" + (f" (extrapolated from {args.steps})" if extrapolated else "")
    rows = []
    for key, label, peak in (("llm_mcp", "LLM + MCP", "llm_mcp"), ("step", "one DiT step (median)", None),
                             ("best_step", "one DiT step (best)", None),
                             ("steps", steps_label, "dit"), ("vae", "VAE decode", "vae"),
                             ("total", "total" + (" (extrapolated)" if extrapolated else ""), None)):
        row = [label]
        for side in sides:
            row.append(common.fmt(times[side][key], 3 if key in ("step", "best_step") else 2))
            if side != "mlx" and "mlx" in times:
                row.append("x" + common.fmt(times[side][key] / times["mlx"][key], 2))
        if "mlx" in results:
            if peak:
                row.append(common.fmt(results["mlx"]["mlx_peak_gb"][peak], 2))
            elif key == "total":
                row.append(common.fmt(max(results["mlx"]["mlx_peak_gb"].values()), 2))
            else:
                row.append("")
        rows.append(row)
    print(common.table(headers, rows))
    print()
    rows = []
    for side, r in results.items():
        median_gflops = step_flops / times[side]["step"] / 1e9
        best_gflops = step_flops / times[side]["best_step"] / 1e9
        rows.append([side, common.fmt(r["peak_rss_gb"], 2), common.fmt(r["rss_loaded_gb"], 2),
                     common.fmt(r.get("cuda_peak_gb"), 2), common.fmt(median_gflops, 1), common.fmt(best_gflops, 1),
                     common.fmt(r["matmul_gflops"], 1), common.fmt(100 * best_gflops / r["matmul_gflops"], 0)])
    print(common.table(["side", "peak RSS GB", "RSS after load GB", "CUDA peak GB", "DiT GFLOP/s (median step)",
                        "DiT GFLOP/s (best step)", "matmul 1024^3 GFLOP/s", "best DiT % of matmul"], rows))
    print(f"DiT work per CFG step: {step_flops / 1e9:.1f} GFLOP (diffusers' forward at batch 2, {cells * cells} "
          f"image tokens, {prompt_tokens} caption tokens; MLX hoists the caption projection and cross K/V, "
          f"{common.dit_forward_flops(config['dit'], 2, cells * cells, prompt_tokens, True) / 1e9:.1f} GFLOP per step)")

    comparisons = []
    if "mlx" in results:
        from PIL import Image

        base = np.asarray(Image.open(results["mlx"]["image"]), dtype=np.int16)
        base_latents = np.load(results["mlx"]["latents"])
        for side in sides[1:]:
            other = np.asarray(Image.open(results[side]["image"]), dtype=np.int16)
            latents = np.load(results[side]["latents"])
            comparisons.append((side, int(np.abs(base - other).max()), float(np.abs(base - other).mean()),
                                float(np.abs(base_latents - latents).max())))
    for side, max_delta, mean_delta, latent_delta in comparisons:
        note = "" if (args.recipe == "none" and side == "torch-fp32") else "  (not expected to match closely)"
        if side == "torch-fp32" and args.recipe != "none":
            note = f"  (recipe {args.recipe}: quantized weights, not expected to match)"
        print(f"image mlx vs {side}: max |delta| {max_delta}/255, mean {mean_delta:.2f}; final latent max |delta| "
              f"{latent_delta:.2e}{note}")
    print()

    stages, weights_bytes = cost_model(folder, config, prompt_tokens, REFERENCE_STEPS, args.size)
    mlx_times = None
    if "mlx" in times:
        mlx_times = dict(times["mlx"])
        if target != REFERENCE_STEPS:
            mlx_times["steps"] = mlx_times["step"] * REFERENCE_STEPS
            mlx_times["total"] = mlx_times["llm_mcp"] + mlx_times["steps"] + mlx_times["vae"]
    print(print_cost_model(stages, weights_bytes, args.recipe, REFERENCE_STEPS, mlx_times, results.get("mlx"),
                           args.compute_efficiency, args.bandwidth_efficiency))
    print()
    if profile:
        print(print_profile(profile, config))

    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "times": times,
                                               "profile": profile}, indent=1))
    mlx_total = times.get("mlx", {}).get("total")
    fp32_total = times.get("torch-fp32", {}).get("total")
    bf16_total = times.get("torch-bf16", {}).get("total")
    ratio = fp32_total / mlx_total if mlx_total and fp32_total else None
    rss_mlx = results.get("mlx", {}).get("peak_rss_gb")
    rss_torch = results.get("torch-fp32", results.get("torch-bf16", {})).get("peak_rss_gb")
    print(f"generate: mlx {common.fmt(mlx_total, 1)} s vs torch-fp32 {common.fmt(fp32_total, 1)} s "
          f"(x{common.fmt(ratio, 2)}), torch-bf16 {common.fmt(bf16_total, 1)} s, "
          f"peak RSS mlx {common.fmt(rss_mlx, 2)} GB vs torch {common.fmt(rss_torch, 2)} GB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=common.RECIPES, default="none",
                        help="Quantization recipe of the MLX side (default: none, the same weights as PyTorch).")
    parser.add_argument("--steps", type=int, default=REFERENCE_STEPS, help="Denoising steps run (default: 20).")
    parser.add_argument("--no-extrapolate", dest="extrapolate", action="store_false",
                        help="With --steps < 20, report the steps run instead of extrapolating to 20.")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Comma-separated subset of {', '.join(SIDES)}.")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompt", default=common.PROMPT)
    parser.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                        help="Run a 2-step generation + decode before timing (auto: on GPUs only).")
    parser.add_argument("--profile", action="store_true", help="Also profile one DiT step and the VAE decode (MLX).")
    parser.add_argument("--profile-repeats", type=int, default=3,
                        help="Plain (unprofiled) runs of each profiled stage; the best is shown (default 3).")
    parser.add_argument("--compute-efficiency", type=float, default=common.COMPUTE_EFFICIENCY)
    parser.add_argument("--bandwidth-efficiency", type=float, default=common.BANDWIDTH_EFFICIENCY)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both sides (OpenBLAS / OpenMP / torch); default: the libraries' own.")
    parser.add_argument("--keep-loaded", action="store_true",
                        help="Keep every MLX component loaded throughout (default: release them as "
                             "`mobileo-mlx generate` does: the LLM and MCP after conditioning, the DiT before "
                             "decoding).")
    parser.add_argument("--cpu-matmul", choices=("auto", "fp32", "bf16"), default="auto",
                        help="MLX side on the CPU: how the vision encoder, DiT and VAE multiply (as the CLI's "
                             "--cpu-matmul; auto: bf16 where the CPU has AVX512-BF16).")
    parser.add_argument("--rebuild", action="store_true", help="Rewrite the cached checkpoint and conversion.")
    parser.add_argument("--json", default=None, help="Also write every measurement to this file.")
    # worker-side arguments
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    if args.worker is None:
        common.set_threads(args.threads)
        return parent(args)
    worker = {"mlx": mlx_worker, "torch-fp32": torch_worker, "torch-bf16": torch_worker,
              "mlx-profile": profile_worker}[args.worker]
    common.emit(worker(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
