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

import statistics
import sys
import time
from pathlib import Path

from benchmarks import cli, cost_model, inputs, measure, profiler, report, torch_side
from benchmarks.report import fmt

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by benchmarks.measure)
import numpy as np  # noqa: E402

SCRIPT = "benchmarks.generate"
REFERENCE_STEPS = 20
WORKER_OPTIONS = ("steps", "guidance", "size", "prompt", "warmup", "profile_repeats", "cpu_matmul", "keep_loaded")


# ----------------------------------------------------------------------------------------------
# workers


def mlx_worker(args) -> dict:
    from mobileo_mlx import platform
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    load = measure.Loading(model)  # timed apart from the stages

    # As `mobileo-mlx generate`: each component loaded when its stage comes (the LLM and MCP
    # freed after conditioning, the DiT before decoding); --keep-loaded loads all up front.
    load(*(("language", "mcp", "dit", "vae") if args.keep_loaded else ("language", "mcp")))
    rss_loaded = measure.rss_gb()
    matmul = measure.mlx_matmul_gflops()
    picture_matmul = measure.mlx_picture_matmul_gflops(model)
    copy = measure.mlx_copy_gbps()
    prompt = model.caption_prompt(args.prompt)
    noise = inputs.noise(model.config["vae"], args.size)
    if cli.warmup(args, platform.backend() != "cpu"):
        warm = model.conditioning(prompt)
        for step in model.generate_latents(warm, steps=2, guidance=args.guidance, noise=noise, size=args.size):
            pass
        model.decode(step.latents)
    peaks = {}
    with model.picture_session():  # as `mobileo-mlx generate` runs a picture's stages
        measure.mlx_reset_peak()
        t0 = time.perf_counter()
        conditioning = model.conditioning(prompt)
        llm_s = time.perf_counter() - t0
        peaks["llm_mcp"] = measure.mlx_peak_gb()
        if not args.keep_loaded:
            model.release(*model.STAGES["conditioning"].components)
        load("dit")

        measure.mlx_reset_peak()
        step_s = []
        last = time.perf_counter()
        for step in model.generate_latents(conditioning, steps=args.steps, guidance=args.guidance, noise=noise,
                                           size=args.size):
            now = time.perf_counter()
            step_s.append(now - last)
            last = now
        peaks["dit"] = measure.mlx_peak_gb()
        if not args.keep_loaded:
            model.release(*model.STAGES["dit"].components)
        load("vae")

        measure.mlx_reset_peak()
        t0 = time.perf_counter()
        image = model.decode(step.latents)[0]
        decode_s = time.perf_counter() - t0
        peaks["vae"] = measure.mlx_peak_gb()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "mlx.png")
    latents = np.array(step.latents.astype(mx.float32)).transpose(0, 3, 1, 2)  # NCHW like torch
    np.save(out / "mlx-latents.npy", latents)
    return {
        **measure.mlx_side(model), "load_s": load.seconds, "llm_mcp_s": llm_s, "step_s": step_s,
        "decode_s": decode_s, "prompt_tokens": conditioning.prompt_tokens, "mlx_peak_gb": peaks,
        "rss_loaded_gb": rss_loaded, "peak_rss_gb": measure.peak_rss_gb(), "matmul_gflops": matmul,
        "picture_matmul_gflops": picture_matmul, "copy_gbps": copy, "image": str(out / "mlx.png"), "latents": str(out / "mlx-latents.npy"),
        "load": measure.load_average(),
    }


def torch_worker(args) -> dict:
    torch, device = torch_side.setup()
    from tests.reference.pipeline_torch import template

    from mobileo_mlx import processing

    dtype = torch_side.dtype_of(args.worker)
    started = time.perf_counter()
    ref = torch_side.build(Path(args.checkpoint), ("vae", "lm", "mcp", "dit"), dtype, device)
    load_s = time.perf_counter() - started
    rss_loaded = measure.rss_gb()
    matmul = torch_side.matmul_gflops(torch, device, dtype)
    noise = inputs.noise({"block_out_channels": ref.vae.config.decoder_block_out_channels,
                          "latent_channels": ref.vae.config.latent_channels}, args.size)
    message = processing.GENERATION_TEMPLATE.format(prompt=args.prompt)

    def condition():
        embeds = torch_side.prompt_embeddings(ref, template(message), device)
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
            torch_side.sync(torch, device)
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

    if cli.warmup(args, device.type == "cuda"):
        decode(denoise(condition()[0], 2))
        torch_side.sync(torch, device)

    t0 = time.perf_counter()
    context, prompt_tokens = condition()
    torch_side.sync(torch, device)
    llm_s = time.perf_counter() - t0
    step_s: list[float] = []
    latents = denoise(context, args.steps, step_s)
    t0 = time.perf_counter()
    pixels = decode(latents)
    torch_side.sync(torch, device)
    decode_s = time.perf_counter() - t0

    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out / f"{args.worker}.png")
    np.save(out / f"{args.worker}-latents.npy", latents.float().cpu().numpy())
    return {
        **torch_side.side_facts(torch, device, args.worker), "load_s": load_s, "llm_mcp_s": llm_s,
        "step_s": step_s, "decode_s": decode_s, "prompt_tokens": prompt_tokens,
        "cuda_peak_gb": torch_side.peak_gb(torch, device), "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": measure.peak_rss_gb(), "matmul_gflops": matmul, "image": str(out / f"{args.worker}.png"),
        "latents": str(out / f"{args.worker}-latents.npy"), "load": measure.load_average(),
    }


def profile_worker(args) -> dict:
    """Per-op time (MLX) of one CFG DiT step and of the VAE decode."""
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    dit, vae = model.component("dit"), model.component("vae")
    conditioning = model.caption_conditioning(args.prompt)
    model.release(*model.STAGES["conditioning"].components)
    noise = inputs.noise(model.config["vae"], args.size)
    latents = model.initial_latents(args.size, noise=noise).astype(model.dtype)
    context = mx.concatenate([conditioning.uncond, conditioning.cond]).astype(model.dtype)
    text = dit.encode_text(context)
    mx.eval(text)
    batch = mx.concatenate([latents, latents])

    def dit_step():
        return dit(batch, time=dit.embed_timestep(499.0), text=text)

    scaled = latents / float(model.config["vae"]["scaling_factor"])
    result = {"side": "mlx-profile", "load": measure.load_average(), "size": args.size}
    result["dit"] = profiler.profile("dit", dit_step, dit, args.profile_repeats)
    result["vae"] = profiler.profile("vae", lambda: vae(scaled), vae, args.profile_repeats)
    result["load_after"] = measure.load_average()
    return result


# ----------------------------------------------------------------------------------------------
# the parent: run the sides, print the tables


def stage_times(result: dict, target_steps: int) -> dict:
    """A worker's seconds per stage; with fewer steps run than ``target_steps``, the missing
    steps counted at the median step's time."""
    steps = result["step_s"]
    median = statistics.median(steps)
    all_steps = sum(steps) + (target_steps - len(steps)) * median if len(steps) < target_steps else sum(steps)
    return {
        "llm_mcp": result["llm_mcp_s"], "step": median, "best_step": min(steps), "steps": all_steps,
        "vae": result["decode_s"], "total": result["llm_mcp_s"] + all_steps + result["decode_s"],
        "load": result["load_s"],
    }


def stage_table(sides: list[str], results: dict, times: dict, target: int, steps_run: int) -> str:
    """Seconds per stage and side, the ratios to MLX, MLX's peak memory per stage."""
    extrapolated = f" (extrapolated from {steps_run})" if target != steps_run else ""
    rows = []
    for key, label, peak in (("llm_mcp", "LLM + MCP", "llm_mcp"), ("step", "one DiT step (median)", None),
                             ("best_step", "one DiT step (best)", None),
                             ("steps", f"all {target} steps{extrapolated}", "dit"), ("vae", "VAE decode", "vae"),
                             ("total", "total" + (" (extrapolated)" if extrapolated else ""), None)):
        peaks = []
        if "mlx" in results:  # the stage's own peak; the total's is the highest of them
            mlx_peaks = results["mlx"]["mlx_peak_gb"]
            peaks = [fmt(mlx_peaks[peak] if peak else max(mlx_peaks.values()), 2) if peak or key == "total" else ""]
        values = {side: times[side][key] for side in sides}
        rows.append((label, values, 3 if key in ("step", "best_step") else 2, False, peaks))
    return report.side_table(sides, rows, suffix=" s", extra_headers=["MLX peak GB"] if "mlx" in results else [])


def work_table(results: dict, times: dict, step_flops: float, vae_flops: float) -> str:
    """Memory per side, and the DiT's and VAE's achieved GFLOP/s as a fraction of the rate of
    the products they run on, measured in the same process (a 1024^3 matmul in the side's
    precision: for MLX with bf16 CPU products, the bf16 GEMM node)."""
    rows = []
    for side, r in results.items():
        peak = r.get("picture_matmul_gflops") or r["matmul_gflops"]
        median_gflops = step_flops / times[side]["step"] / 1e9
        best_gflops = step_flops / times[side]["best_step"] / 1e9
        vae_gflops = vae_flops / times[side]["vae"] / 1e9
        rows.append([side, fmt(r["peak_rss_gb"], 2), fmt(r["rss_loaded_gb"], 2), fmt(r.get("cuda_peak_gb"), 2),
                     fmt(median_gflops, 1), fmt(best_gflops, 1), fmt(vae_gflops, 1), fmt(peak, 1),
                     fmt(100 * best_gflops / peak, 0), fmt(100 * vae_gflops / peak, 0)])
    return report.table(["side", "peak RSS GB", "RSS after load GB", "CUDA peak GB", "DiT GFLOP/s (median step)",
                         "DiT GFLOP/s (best step)", "VAE GFLOP/s", "its matmul 1024^3 GFLOP/s",
                         "best DiT % of it", "VAE % of it"], rows)


def image_comparison(sides: list[str], results: dict, recipe: str) -> list[str]:
    """How far every other side's picture and final latent are from MLX's."""
    if "mlx" not in results:
        return []
    from PIL import Image

    base = np.asarray(Image.open(results["mlx"]["image"]), dtype=np.int16)
    base_latents = np.load(results["mlx"]["latents"])
    lines = []
    for side in [side for side in sides if side != "mlx"]:
        delta = np.abs(base - np.asarray(Image.open(results[side]["image"]), dtype=np.int16))
        latent_delta = float(np.abs(base_latents - np.load(results[side]["latents"])).max())
        note = "" if (recipe == "none" and side == "torch-fp32") else "  (not expected to match closely)"
        if side == "torch-fp32" and recipe != "none":
            note = f"  (recipe {recipe}: quantized weights, not expected to match)"
        lines.append(f"image mlx vs {side}: max |delta| {int(delta.max())}/255, mean {float(delta.mean()):.2f}; "
                     f"final latent max |delta| {latent_delta:.2e}{note}")
    return lines


def cost_table(stages, weights_bytes: dict, recipe: str, steps: int, measured: dict | None,
               mlx_result: dict | None, compute_eff: float, bandwidth_eff: float) -> str:
    """The cost model: work per stage, and the seconds it predicts per chip (and on this machine)."""
    lines = [f"cost model (recipe {recipe}; weights as a GPU holds them: fp16, quantized layers packed; "
             f"activations fp16, every op's inputs and outputs counted once)"]
    rows = [[s.name + (f" x{s.repeat}" if s.repeat > 1 else ""), fmt(s.flops / 1e9, 1), fmt(s.bytes / 1e9, 2),
             fmt(s.flops / max(s.bytes, 1), 0)] for s in stages]
    lines.append(report.table(["stage", "GFLOP (each)", "GB moved (each)", "FLOP/byte"], rows))
    lines.append("weights (GB): " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in weights_bytes.items()))
    lines.append("")
    lines.append(f"predicted seconds = max(FLOPs / ({compute_eff:.0%} x peak fp16 FLOP/s), "
                 f"bytes / ({bandwidth_eff:.0%} x peak bandwidth)) per stage")

    def row(label, tflops, gbps, t):
        return [label, tflops, gbps, fmt(t[0], 2), fmt(t[1] / steps, 3), fmt(t[1], 1), fmt(t[2], 2), fmt(sum(t), 1)]

    rows = [row(chip, fmt(tflops, 1), fmt(gbps, 0), t)
            for chip, tflops, gbps, t in cost_model.apple_predictions(stages, compute_eff, bandwidth_eff)]
    if mlx_result is not None:
        # the rate of the products the stages run: bf16 where the CPU matmuls are (the picture stages and the
        # prompt's encoding), else float32
        rate = mlx_result.get("picture_matmul_gflops") or mlx_result["matmul_gflops"]
        tflops, gbps, t = cost_model.machine_prediction(stages, rate, mlx_result["copy_gbps"])
        rows.append(row(f"this machine ({mlx_result['backend']}, measured rates, eff. 1)", fmt(tflops, 3),
                        fmt(gbps, 0), t))
        if measured:
            rows.append(["this machine, measured (MLX)", "", "", fmt(measured["llm_mcp"], 2), fmt(measured["step"], 3),
                         fmt(measured["steps"], 1), fmt(measured["vae"], 2), fmt(measured["total"], 1)])
    lines.append(report.table(["chip", "fp16 TFLOP/s", "GB/s", "LLM+MCP s", "DiT step s", f"{steps} steps s",
                               "VAE s", "total s"], rows))
    return "\n".join(lines)


def profile_tables(profile: dict) -> str:
    size = profile.get("size", 512)
    return "\n\n".join([
        profiler.profile_table(profile["dit"], "one CFG DiT step (batch 2, t=499)", profile["load"]),
        profiler.profile_table(profile["vae"], f"VAE decode (one {size}x{size} image)", profile["load"]),
    ]) + "\n"


def parent(args) -> int:
    sides = cli.pick(args.sides, cli.SIDES, "side")
    checkpoint = inputs.full_checkpoint(args.rebuild)
    folder = inputs.converted(args.recipe, args.rebuild)
    config = inputs.model_config(folder)
    to_worker = cli.forward(args, WORKER_OPTIONS, folder=folder, checkpoint=checkpoint,
                            out=inputs.out_dir(f"generate-{args.recipe}"))
    print(report.header(SCRIPT, measure.machine(), args.threads))
    results = {side: measure.run_worker(SCRIPT, side, to_worker) for side in sides}
    profile = measure.run_worker(SCRIPT, "mlx-profile", to_worker) if args.profile else None

    target = max(args.steps, REFERENCE_STEPS) if args.extrapolate else args.steps
    times = {side: stage_times(r, target) for side, r in results.items()}
    prompt_tokens = next(iter(results.values()))["prompt_tokens"]
    tokens = inputs.latent_cells(config["vae"], args.size) ** 2
    step_flops = cost_model.dit_forward_flops(config["dit"], 2, tokens, prompt_tokens)

    print()
    print(f"generate {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, recipe {args.recipe}, "
          f"prompt {prompt_tokens} tokens")
    for side, r in results.items():
        print(f"  {side}: {r['device']} {r['dtype']}, load {r['load_s']:.1f} s (not in the total), run at {r['load']}")
    print(stage_table(sides, results, times, target, args.steps))
    print()
    print(work_table(results, times, step_flops, cost_model.vae_decode_flops(config["vae"], args.size)))
    print(f"DiT work per CFG step: {step_flops / 1e9:.1f} GFLOP (diffusers' forward at batch 2, {tokens} "
          f"image tokens, {prompt_tokens} caption tokens; MLX hoists the caption projection and cross K/V, "
          f"{cost_model.dit_forward_flops(config['dit'], 2, tokens, prompt_tokens, True) / 1e9:.1f} GFLOP per step)")
    for line in image_comparison(sides, results, args.recipe):
        print(line)
    print()

    stages, weights_bytes = cost_model.generation_stages(folder, config, prompt_tokens, REFERENCE_STEPS, args.size)
    mlx_times = None
    if "mlx" in times:  # the model predicts 20 steps: the measured row too
        mlx_times = dict(times["mlx"])
        if target != REFERENCE_STEPS:
            mlx_times["steps"] = mlx_times["step"] * REFERENCE_STEPS
            mlx_times["total"] = mlx_times["llm_mcp"] + mlx_times["steps"] + mlx_times["vae"]
    print(cost_table(stages, weights_bytes, args.recipe, REFERENCE_STEPS, mlx_times, results.get("mlx"),
                     args.compute_efficiency, args.bandwidth_efficiency))
    print()
    if profile:
        print(profile_tables(profile))

    report.write_json(args.json, {"args": vars(args), "results": results, "times": times, "profile": profile})
    mlx_total = times.get("mlx", {}).get("total")
    fp32_total = times.get("torch-fp32", {}).get("total")
    bf16_total = times.get("torch-bf16", {}).get("total")
    ratio = fp32_total / mlx_total if mlx_total and fp32_total else None
    rss_mlx = results.get("mlx", {}).get("peak_rss_gb")
    rss_torch = results.get("torch-fp32", results.get("torch-bf16", {})).get("peak_rss_gb")
    print(f"generate: mlx {fmt(mlx_total, 1)} s vs torch-fp32 {fmt(fp32_total, 1)} s "
          f"(x{fmt(ratio, 2)}), torch-bf16 {fmt(bf16_total, 1)} s, "
          f"peak RSS mlx {fmt(rss_mlx, 2)} GB vs torch {fmt(rss_torch, 2)} GB")
    return 0


def build_parser():
    parser = cli.parser(SCRIPT, __doc__)
    cli.add_recipe(parser)
    parser.add_argument("--steps", type=cli.positive_int, default=REFERENCE_STEPS,
                        help="Denoising steps run (default: 20).")
    parser.add_argument("--no-extrapolate", dest="extrapolate", action="store_false",
                        help="With --steps < 20, report the steps run instead of extrapolating to 20.")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompt", default=inputs.PROMPT)
    cli.add_sides(parser, warmup="Run a 2-step generation + decode",
                  keep_loaded="Keep every MLX component loaded throughout (default: release them as "
                              "`mobileo-mlx generate` does: the LLM and MCP after conditioning, the DiT before "
                              "decoding).")
    cli.add_profile(parser, "one DiT step and the VAE decode")
    cli.add_cost_model(parser)
    cli.add_cache_and_json(parser)
    cli.add_worker(parser, "folder", "checkpoint", "out")
    return parser


def main(argv=None) -> int:
    workers = {"mlx": mlx_worker, "torch-fp32": torch_worker, "torch-bf16": torch_worker,
               "mlx-profile": profile_worker}
    return cli.main(build_parser(), parent, workers, argv)


if __name__ == "__main__":
    sys.exit(main())
