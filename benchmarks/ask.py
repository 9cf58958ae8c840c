"""Image understanding: a 1024x1024 picture and a 32-token greedy answer, in MLX and in PyTorch.

    python -m benchmarks.ask [--recipe none|mixed|8|4] [--tokens 32] [--sides mlx,torch-fp32,torch-bf16]
                             [--profile] [--model demo|FOLDER]

Same cached full-size random checkpoint and conversions as ``benchmarks.generate``. Each side runs
in its own process:

* ``mlx``        ``MobileO.image_features`` (FastViTHD + projector), ``embed_prompt``, then
                 mlx-lm's ``stream_generate`` on the spliced embeddings (what ``MobileO.ask`` runs);
* ``torch-fp32`` / ``torch-bf16``: the test-side FastViTHD reference + projector, transformers'
                 Qwen2 (sdpa attention): a prefill that keeps the last logits only, then a greedy
                 token-by-token loop on the KV cache.

Printed per side: vision encoder (preprocessing + tower + projector), prompt embedding, prefill
(time and tokens/s), time to first token (from the picture to the first token), decode tokens/s,
MLX peak memory and peak RSS; the greedy tokens of the two fp32 sides are compared (same weights);
and a cost model of the same stages on Apple-silicon GPUs. ``--profile`` adds a per-op breakdown of one
vision-tower pass (MLX). ``--model`` runs the MLX side on another converted folder (``demo``: the demo
model, which checks the harness) instead of the full-size conversion.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from benchmarks import cli, cost_model, inputs, measure, profiler, report, torch_side
from benchmarks.report import fmt

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by benchmarks.measure)

SCRIPT = "benchmarks.ask"
WORKER_OPTIONS = ("tokens", "size", "question", "warmup", "cpu_matmul", "keep_loaded", "profile_repeats")


# ----------------------------------------------------------------------------------------------
# workers


def mlx_worker(args) -> dict:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mobileo_mlx import platform, processing
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    load = measure.Loading(model)  # timed apart from the stages

    # As `mobileo-mlx ask`: the language model loaded once the vision tower is freed (--keep-loaded: all up front).
    warm = cli.warmup(args, platform.backend() != "cpu")
    load("vision", "projector", *(("language",) if args.keep_loaded or warm else ()))
    rss_loaded = measure.rss_gb()
    matmul = measure.mlx_matmul_gflops()
    picture = inputs.picture(args.size)
    prompt = processing.understanding_prompt(args.question)
    if warm:
        for _ in stream_generate(model.component("language"), model.tokenizer.hf, prompt=mx.array([], dtype=mx.uint32),
                                 input_embeddings=model.embed_prompt(prompt, picture)[0], max_tokens=2,
                                 sampler=make_sampler(temp=0.0)):
            pass
    peaks = {}

    measure.mlx_reset_peak()
    t0 = time.perf_counter()
    features = model.image_features(picture)
    mx.eval(features)
    t_vision = time.perf_counter()
    peaks["vision"] = measure.mlx_peak_gb()
    if not args.keep_loaded:  # what `mobileo-mlx ask` does (outside the timed stages)
        model.release(*model.STAGES["vision"].components)
    pause = load("language")  # the LM's loading: not part of the answer's times
    model.image_features = lambda image: features  # embed_prompt reuses the features just timed
    embeddings = model.embed_prompt(prompt, picture)
    mx.eval(embeddings)
    t_embed = time.perf_counter()

    measure.mlx_reset_peak()
    tokens, stamps = [], []
    with model.stage("text"):  # as MobileO.ask
        for response in stream_generate(model.component("language"), model.tokenizer.hf,
                                        prompt=mx.array([], dtype=mx.uint32), input_embeddings=embeddings[0],
                                        max_tokens=args.tokens, sampler=make_sampler(temp=0.0)):
            if response.finish_reason == "stop":  # the stop token: not part of the answer
                break
            stamps.append(time.perf_counter())
            tokens.append(int(response.token))
            last = response
    peaks["language"] = measure.mlx_peak_gb()
    return {
        **measure.mlx_side(model), **answer_times(t0 + pause, t_vision + pause, t_embed, stamps), "load_s": load.seconds,
        "tokens": tokens, "prompt_tokens": int(embeddings.shape[1]), "mlx_lm_generation_tps": last.generation_tps,
        "mlx_peak_gb": peaks, "rss_loaded_gb": rss_loaded, "peak_rss_gb": measure.peak_rss_gb(),
        "matmul_gflops": matmul, "load": measure.load_average(),
    }


def torch_worker(args) -> dict:
    torch, device = torch_side.setup()
    from tests.reference.pipeline_torch import template

    dtype = torch_side.dtype_of(args.worker)
    started = time.perf_counter()
    ref = torch_side.build(Path(args.checkpoint), ("vision", "projector", "lm"), dtype, device)
    load_s = time.perf_counter() - started
    rss_loaded = measure.rss_gb()
    matmul = torch_side.matmul_gflops(torch, device, dtype)
    picture = inputs.picture(args.size)
    text = template(f"<image>\n{args.question}")
    eos = ref.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def answer(embeds, max_tokens, stamps):  # greedy: a prefill keeping the last logits, then the KV cache
        out = ref.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]
        torch_side.sync(torch, device)
        stamps.append(time.perf_counter())
        cache = out.past_key_values
        while len(tokens) < max_tokens and tokens[-1] != eos:
            out = ref.lm(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            stamps.append(time.perf_counter())
        return tokens

    if cli.warmup(args, device.type == "cuda"):
        features = torch_side.image_features(ref, picture, device, dtype)
        answer(torch_side.prompt_embeddings(ref, text, device, features), 2, [])

    t0 = time.perf_counter()
    features = torch_side.image_features(ref, picture, device, dtype)
    torch_side.sync(torch, device)
    t_vision = time.perf_counter()
    embeds = torch_side.prompt_embeddings(ref, text, device, features)
    torch_side.sync(torch, device)
    t_embed = time.perf_counter()
    stamps: list[float] = []
    tokens = answer(embeds, args.tokens, stamps)
    if tokens and tokens[-1] == eos:  # mlx-lm does not yield the stop token; compare like with like
        tokens, stamps = tokens[:-1], stamps[:-1] or stamps
    return {
        **torch_side.side_facts(torch, device, args.worker), **answer_times(t0, t_vision, t_embed, stamps),
        "load_s": load_s, "tokens": tokens, "prompt_tokens": int(embeds.shape[1]),
        "cuda_peak_gb": torch_side.peak_gb(torch, device), "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": measure.peak_rss_gb(), "matmul_gflops": matmul, "load": measure.load_average(),
    }


def profile_worker(args) -> dict:
    """Per-op time (MLX) of one vision-tower pass (FastViTHD on the preprocessed picture)."""
    from mobileo_mlx import processing
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    vision = model.component("vision")
    pixels = mx.array(processing.preprocess_image(inputs.picture(args.size), model.vision_size)).astype(model.dtype)
    result = {"side": "mlx-profile", "load": measure.load_average(), "vision_size": model.vision_size}
    with model.stage("vision"):  # as MobileO.image_features
        result["vision"] = profiler.profile("vision", lambda: vision(pixels), vision, args.profile_repeats)
    result["load_after"] = measure.load_average()
    return result


def answer_times(start: float, vision_done: float, embedded: float, stamps: list[float]) -> dict:
    """A worker's seconds per stage from its clock readings (``stamps``: each token's arrival)."""
    return {"vision_s": vision_done - start, "embed_s": embedded - vision_done, "first_token_s": stamps[0] - embedded,
            "ttft_s": stamps[0] - start, "decode_s": stamps[-1] - stamps[0],
            "token_gaps_s": [b - a for a, b in zip(stamps, stamps[1:])]}


# ----------------------------------------------------------------------------------------------
# the parent: run the sides, print the tables

STAT_ROWS = (  # key, label, higher is better
    ("vision", "vision encoder s", False), ("embed", "prompt embedding s", False),
    ("prefill", "prefill + first token s", False), ("prefill_tps", "prefill tokens/s", True),
    ("ttft", "time to first token s", False), ("decode_tps", "decode tokens/s (mean)", True),
    ("decode_median_tps", "decode tokens/s (median gap)", True),
)


def side_stats(r: dict) -> dict:
    prefill = r["first_token_s"]
    gaps = r["token_gaps_s"]
    return {"vision": r["vision_s"], "embed": r["embed_s"], "prefill": prefill,
            "prefill_tps": r["prompt_tokens"] / prefill, "ttft": r["ttft_s"],
            "decode_tps": len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else None,
            "decode_median_tps": 1 / statistics.median(gaps) if gaps else None}


def memory_table(results: dict) -> str:
    rows = []
    for side, r in results.items():
        peak = r.get("mlx_peak_gb") or {}
        rows.append([side, fmt(peak.get("vision"), 2), fmt(peak.get("language"), 2), fmt(r.get("cuda_peak_gb"), 2),
                     fmt(r["rss_loaded_gb"], 2), fmt(r["peak_rss_gb"], 2), fmt(r["matmul_gflops"], 1)])
    return report.table(["side", "MLX peak vision GB", "MLX peak LM GB", "CUDA peak GB", "RSS after load GB",
                         "peak RSS GB", "matmul 1024^3 GFLOP/s"], rows)


def cost_table(stages, recipe: str, compute_eff: float, bandwidth_eff: float) -> str:
    rows = [[s.name, fmt(s.flops / 1e9, 2), fmt(s.bytes / 1e9, 3)] for s in stages]
    predicted = [[chip, fmt(t[0], 3), fmt(t[1], 3), fmt(t[0] + t[1], 3), fmt(1 / t[2], 0)]
                 for chip, _, _, t in cost_model.apple_predictions(stages, compute_eff, bandwidth_eff)]
    return "\n".join([
        f"cost model (recipe {recipe}; fp16 weights, quantized layers packed)",
        report.table(["stage", "GFLOP", "GB moved"], rows),
        f"predicted = max(FLOPs / ({compute_eff:.0%} x peak), bytes / "
        f"({bandwidth_eff:.0%} x bandwidth)); embedding and sampling not modelled",
        report.table(["chip", "vision s", "prefill s", "TTFT s", "decode tok/s"], predicted),
    ])


def model_folder(args) -> tuple[Path, Path | None]:
    """The converted folder the MLX side runs and the checkpoint the PyTorch sides build from
    (None with ``--model``: another model has no PyTorch twin here)."""
    if not args.model:
        return inputs.converted(args.recipe, args.rebuild), inputs.full_checkpoint(args.rebuild)
    if args.model == "demo":
        from mobileo_mlx.hub import resolve_model

        return Path(resolve_model("demo")), None
    return Path(args.model), None


def parent(args) -> int:
    sides = cli.pick(args.sides, cli.SIDES, "side")
    if args.model and sides != ["mlx"]:
        raise SystemExit("--model runs the MLX side only: add --sides mlx")
    folder, checkpoint = model_folder(args)
    config = inputs.model_config(folder)
    to_worker = cli.forward(args, WORKER_OPTIONS, folder=folder, checkpoint=checkpoint)
    print(report.header(SCRIPT, measure.machine(), args.threads))
    results = {side: measure.run_worker(SCRIPT, side, to_worker) for side in sides}
    profile = measure.run_worker(SCRIPT, "mlx-profile", to_worker) if args.profile else None

    some = next(iter(results.values()))
    print()
    print(f"ask: {args.size}x{args.size} picture, {some['prompt_tokens']} prompt tokens (256 image tokens), "
          f"greedy answer of up to {args.tokens} tokens, recipe {args.recipe}")
    for side, r in results.items():
        print(f"  {side}: {r['device']} {r['dtype']}, load {r['load_s']:.1f} s, {len(r['tokens'])} tokens, "
              f"run at {r['load']}")
    stats = {side: side_stats(r) for side, r in results.items()}
    rows = [(label, {side: stats[side][key] for side in sides}, 1 if higher_is_better else 3, higher_is_better, [])
            for key, label, higher_is_better in STAT_ROWS]
    print(report.side_table(sides, rows))
    print("(ratio columns: how many times better MLX is; > 1 = MLX faster)")
    print()
    print(memory_table(results))
    if "mlx" in results and "torch-fp32" in results:
        a, b = results["mlx"]["tokens"], results["torch-fp32"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note = "" if args.recipe == "none" else f" (recipe {args.recipe}: quantized, may differ)"
        print(f"greedy tokens mlx vs torch-fp32: first {same} of {len(a)}/{len(b)} identical{note}")
    print()

    stages = cost_model.understanding_stages(folder, config, some["prompt_tokens"], args.size)
    print(cost_table(stages, args.recipe, args.compute_efficiency, args.bandwidth_efficiency))
    print()
    if profile:
        size = profile["vision_size"]
        print(profiler.profile_table(profile["vision"], f"vision tower (one {size}x{size} picture)", profile["load"]))
        print()
    report.write_json(args.json, {"args": vars(args), "results": results, "stats": stats, "profile": profile})
    m, f, b = (stats.get(s) for s in cli.SIDES)
    print(f"ask: mlx TTFT {fmt(m and m['ttft'], 2)} s, {fmt(m and m['decode_tps'], 1)} tok/s vs "
          f"torch-fp32 TTFT {fmt(f and f['ttft'], 2)} s, {fmt(f and f['decode_tps'], 1)} tok/s, "
          f"torch-bf16 TTFT {fmt(b and b['ttft'], 2)} s, {fmt(b and b['decode_tps'], 1)} tok/s, "
          f"peak RSS mlx {fmt(results.get('mlx', {}).get('peak_rss_gb'), 2)} GB vs torch "
          f"{fmt(results.get('torch-fp32', {}).get('peak_rss_gb'), 2)} GB")
    return 0


def build_parser():
    parser = cli.parser(SCRIPT, __doc__)
    cli.add_recipe(parser)
    parser.add_argument("--tokens", type=cli.positive_int, default=32, help="Answer length (greedy; default 32).")
    parser.add_argument("--size", type=int, default=1024, help="Picture size (default 1024).")
    parser.add_argument("--question", default=inputs.QUESTION)
    cli.add_sides(parser, warmup="Answer once (2 tokens)",
                  keep_loaded="Load every component up front and keep the vision tower while the LM answers "
                              "(default: as `mobileo-mlx ask`, the vision tower freed once the picture's features "
                              "exist, then the LM loaded).")
    cli.add_profile(parser, "one vision-tower pass")
    parser.add_argument("--model", default=None,
                        help="A converted folder or 'demo' for the MLX side instead of the full-size conversion.")
    cli.add_cost_model(parser)
    cli.add_cache_and_json(parser)
    cli.add_worker(parser, "folder", "checkpoint")
    return parser


def main(argv=None) -> int:
    return cli.main(build_parser(), parent, {"mlx": mlx_worker, "torch-fp32": torch_worker,
                                             "torch-bf16": torch_worker, "mlx-profile": profile_worker}, argv)


if __name__ == "__main__":
    sys.exit(main())
