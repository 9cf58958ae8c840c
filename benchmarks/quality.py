"""How far each quantization recipe moves every stage's output from float32, on the same inputs.

    python -m benchmarks.quality [--recipes none,8,4,mixed] [--steps 20] [--json out.json]

The baseline is the ``none`` conversion (the checkpoint's bf16 values, unquantized) computed in
float32. Every recipe runs in its own process, in the backend's compute dtype (fp32 on CPU, fp16 on
GPUs), on the same inputs (a seeded 1024x1024 picture, the same question and prompt, the same
seeded noise), and is compared with the baseline:

* vision features: FastViTHD + projector output (the 256 image tokens the LM sees);
* LM logits: at the last prompt position of the understanding prompt (with the image), and the
  greedy agreement over 64 tokens: teacher-forced (the recipe predicts each next token of the
  baseline's greedy answer; % of the 64 where its argmax is the baseline's token) and free-running
  (how many of its own first greedy tokens equal the baseline's);
* MCP output: the DiT conditioning of the generation prompt (LM + MCP end to end);
* DiT velocity: one CFG forward (t = 499) of the recipe's DiT on the *baseline's* conditioning and
  the same noisy latent (the DiT alone);
* final latent of a full run (20 steps by default): the recipe's own conditioning and DiT;
* final image: the recipe's VAE on its own final latent, PSNR against the baseline's image; and the
  recipe's VAE on the baseline's latent (the VAE alone).

Errors are relative L2 (||a - b|| / ||b||) and cosine similarity. These are *random* weights: they
tell how much quantization perturbs the computation, not how good the pictures or answers are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks import cli, inputs, measure, report
from benchmarks.report import fmt

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by benchmarks.measure)
import numpy as np  # noqa: E402

SCRIPT = "benchmarks.quality"
GREEDY_TOKENS = 64
VELOCITY_TIMESTEP = 499.0


def _np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def worker(args) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    from mobileo_mlx import platform, processing
    from mobileo_mlx.pipeline import MobileO

    baseline = args.worker == "baseline"
    model = MobileO(args.folder, cpu_matmul="fp32" if baseline else args.cpu_matmul)
    if baseline:
        model.dtype = mx.float32  # components load (and compute) in float32
    out: dict[str, np.ndarray] = {}
    reference = dict(np.load(args.reference)) if args.reference else None
    timings = {}
    t0 = time.perf_counter()

    # vision features (FastViTHD + projector) of the shared picture
    picture = inputs.picture(1024)
    features = model.image_features(picture)
    mx.eval(features)
    out["vision"] = _np(features)
    model.image_features = lambda image: features
    timings["vision"] = time.perf_counter() - t0
    model.release(*model.STAGES["vision"].components)

    # LM: last-position logits, 64 greedy tokens, teacher-forced argmaxes on the baseline's tokens
    t = time.perf_counter()
    lm = model.component("language")
    embeddings = model.embed_prompt(processing.understanding_prompt(inputs.QUESTION), picture)
    head = lm.model.embed_tokens.as_linear if lm.args.tie_word_embeddings else lm.lm_head
    cache = make_prompt_cache(lm)
    logits = head(lm.model(None, cache, embeddings)[:, -1])  # the head on the last position only
    out["logits"] = _np(logits)[0]
    tokens = []
    for _ in range(GREEDY_TOKENS):  # greedy, through any stop token: 64 positions to compare
        token = mx.argmax(logits, axis=-1)
        mx.eval(token)
        tokens.append(int(token.item()))
        logits = lm(token[None], cache=cache)[:, -1]
    out["tokens"] = np.array(tokens)
    forced = out["tokens"] if reference is None else reference["tokens"]
    sequence = mx.concatenate([embeddings, lm.embed(mx.array(forced[None, :-1])).astype(embeddings.dtype)], 1)
    hidden = lm.model(None, None, sequence)[0, embeddings.shape[1] - 1:]
    out["forced_argmax"] = np.array(mx.argmax(head(hidden), axis=-1))
    del cache, logits, hidden, sequence
    timings["language"] = time.perf_counter() - t

    # MCP output (the DiT conditioning), LM + MCP end to end
    t = time.perf_counter()
    conditioning = model.caption_conditioning(inputs.PROMPT)
    out["cond"], out["uncond"] = _np(conditioning.cond), _np(conditioning.uncond)
    model.release(*model.STAGES["conditioning"].components)
    timings["mcp"] = time.perf_counter() - t

    # DiT velocity on the baseline's conditioning: the DiT alone
    t = time.perf_counter()
    dit = model.component("dit")
    noise = inputs.noise(model.config["vae"], 512)
    latents = model.initial_latents(512, noise=noise).astype(model.dtype)
    cond = mx.array(reference["cond"] if reference is not None else out["cond"])
    uncond = mx.array(reference["uncond"] if reference is not None else out["uncond"])
    text = dit.encode_text(mx.concatenate([uncond, cond]).astype(model.dtype))
    with model.stage("dit"):  # as the pipeline runs a step
        velocity = dit(mx.concatenate([latents, latents]), time=dit.embed_timestep(VELOCITY_TIMESTEP), text=text)
        mx.eval(velocity)
    out["velocity"] = _np(velocity)
    del text, velocity
    timings["dit_velocity"] = time.perf_counter() - t

    # a full run on the recipe's own conditioning
    t = time.perf_counter()
    for step in model.generate_latents(conditioning, steps=args.steps, guidance=1.5, noise=noise):
        pass
    out["latents"] = _np(step.latents)
    model.release(*model.STAGES["dit"].components)
    timings["denoise"] = time.perf_counter() - t

    t = time.perf_counter()
    out["image"] = np.asarray(model.decode(step.latents)[0])
    if reference is not None:
        out["image_vae_only"] = np.asarray(model.decode(mx.array(reference["latents"]))[0])
    timings["vae"] = time.perf_counter() - t

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return {"side": args.worker, "dtype": str(model.dtype).split(".")[-1], "cpu_matmul": model.cpu_matmul,
            "backend": platform.backend(),
            "recipe": model.config.get("quantization", {}).get("recipe"), "npz": str(path), "timings": timings,
            "peak_rss_gb": measure.peak_rss_gb(), "mlx_peak_gb": measure.mlx_peak_gb(), "load": measure.load_average()}


# ----------------------------------------------------------------------------------------------
# comparing


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def compare(result: dict, base: dict) -> dict:
    agree_forced = float(np.mean(result["forced_argmax"] == base["tokens"]))
    mismatch = np.nonzero(result["tokens"] != base["tokens"])[0]
    free = int(mismatch[0]) if mismatch.size else len(base["tokens"])
    row = {
        "vision": (rel_l2(result["vision"], base["vision"]), cosine(result["vision"], base["vision"])),
        "logits": (rel_l2(result["logits"], base["logits"]), cosine(result["logits"], base["logits"])),
        "top1_last": bool(np.argmax(result["logits"]) == np.argmax(base["logits"])),
        "greedy_forced": agree_forced,
        "greedy_free": free,
        "mcp": (rel_l2(result["cond"], base["cond"]), cosine(result["cond"], base["cond"])),
        "velocity": (rel_l2(result["velocity"], base["velocity"]), cosine(result["velocity"], base["velocity"])),
        "latents": (rel_l2(result["latents"], base["latents"]), cosine(result["latents"], base["latents"])),
        "psnr": psnr(result["image"], base["image"]),
        "max_delta": int(np.abs(result["image"].astype(np.int16) - base["image"].astype(np.int16)).max()),
    }
    if "image_vae_only" in result:
        row["psnr_vae_only"] = psnr(result["image_vae_only"], base["image"])
    return row


def _err(pair) -> str:
    rel, cos = pair
    return f"{rel:.2e} ({cos:.5f})"


def quality_table(variants: list[tuple[str, str]], results: dict, runs: dict, sizes: dict, compute: str,
                  steps: int) -> str:
    headers = ["recipe (compute dtype)", "size GiB", "vision feat.", "LM logits (last)", "greedy 64: forced / free",
               "MCP out", "DiT velocity", f"latent ({steps} steps)", "image PSNR dB (max abs diff)", "VAE-only PSNR dB"]
    rows = []
    for recipe, matmul in variants:
        r = results[f"{recipe}/{matmul}"]
        bf16 = runs.get(f"{recipe}/{matmul}", {}).get("cpu_matmul") == "bf16"
        label = f"{recipe} ({compute}" + (", bf16 matmuls)" if bf16 else ")")
        if r is None:
            rows.append([label, fmt(sizes[recipe], 2), "= baseline", "= baseline", "100% / 64", "= baseline",
                         "= baseline", "= baseline", "inf (0)", "inf"])
            continue
        rows.append([label, fmt(sizes[recipe], 2), _err(r["vision"]),
                     _err(r["logits"]) + ("" if r["top1_last"] else " top-1 differs"),
                     f"{100 * r['greedy_forced']:.0f}% / {r['greedy_free']}", _err(r["mcp"]), _err(r["velocity"]),
                     _err(r["latents"]), f"{r['psnr']:.1f} ({r['max_delta']})", fmt(r.get("psnr_vae_only"), 1)])
    return report.table(headers, rows)


def parent(args) -> int:
    from mobileo_mlx import platform

    recipes = cli.pick(args.recipes, inputs.RECIPES, "recipe")
    matmuls = cli.pick(args.cpu_matmul, cli.CPU_MATMULS, "CPU matmul")
    inputs.full_checkpoint(args.rebuild)
    folders = {recipe: inputs.converted(recipe, args.rebuild) for recipe in sorted(set(recipes) | {"none"})}
    out = inputs.out_dir("quality")
    print(report.header(SCRIPT, measure.machine()))
    compute = str(platform.compute_dtype()).split(".")[-1]
    base_npz = out / f"baseline-{args.steps}.npz"
    runs = {}
    if args.reuse_baseline and base_npz.is_file():
        measure.log(f"reusing the baseline {base_npz}")
    else:
        runs["baseline"] = measure.run_worker(SCRIPT, "baseline", cli.forward(
            args, ("steps",), folder=folders["none"], out=base_npz))
    base = dict(np.load(base_npz))
    results = {}
    variants = [(recipe, matmul) for recipe in recipes for matmul in matmuls]
    for recipe, matmul in variants:
        key = f"{recipe}/{matmul}"
        if recipe == "none" and compute == "float32" and matmul == "fp32":
            results[key] = None  # the baseline itself: same weights, same dtype
            continue
        npz = out / f"{recipe}-{matmul}-{args.steps}.npz"
        runs[key] = measure.run_worker(SCRIPT, recipe, cli.forward(
            args, ("steps",), folder=folders[recipe], out=npz, reference=base_npz, cpu_matmul=matmul))
        results[key] = compare(dict(np.load(npz)), base)

    sizes = {r: sum(p.stat().st_size for p in folders[r].glob("*.safetensors")) / 2**30 for r in recipes}
    print()
    print(f"quality vs float32 (baseline: recipe none computed in float32); errors: relative L2 (cosine); "
          f"random weights, {args.steps}-step run, guidance 1.5")
    print(quality_table(variants, results, runs, sizes, compute, args.steps))
    print()
    for name, run in runs.items():
        print(f"  {name}: {run['dtype']} on {run['backend']}, peak RSS {run['peak_rss_gb']:.2f} GB, "
              f"stage seconds {json.dumps({k: round(v, 1) for k, v in run['timings'].items()})}, run at {run['load']}")
    report.write_json(args.json, {"args": vars(args), "runs": runs, "results": results})
    return 0


def build_parser():
    parser = cli.parser(SCRIPT, __doc__)
    parser.add_argument("--recipes", default=",".join(inputs.RECIPES),
                        help="Comma-separated recipes to compare with float32 (default: all).")
    parser.add_argument("--steps", type=cli.positive_int, default=20, help="Steps of the full run (default 20).")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="Reuse the cached float32 baseline outputs of an earlier run with the same --steps.")
    parser.add_argument("--cpu-matmul", default="fp32",
                        help="Comma-separated CPU matmul precisions to run each recipe with (fp32, bf16, auto; "
                             "default fp32); the baseline is always fp32.")
    cli.add_cache_and_json(parser, json_help="the comparisons")
    cli.add_worker(parser, "folder", "out", "reference")
    return parser


def main(argv=None) -> int:
    return cli.main(build_parser(), parent, {"baseline": worker, **{recipe: worker for recipe in inputs.RECIPES}},
                    argv)


if __name__ == "__main__":
    sys.exit(main())
