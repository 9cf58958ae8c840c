"""Image understanding: a 1024x1024 picture and a 32-token greedy answer, in MLX and in PyTorch.

    python -m benchmarks.ask [--recipe none|mixed|8|4] [--tokens 32] [--sides mlx,torch-fp32,torch-bf16]

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
and a cost model of the same stages on Apple-silicon GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common

import mlx.core as mx  # noqa: E402  (after mobileo_mlx, imported by common)

SIDES = ("mlx", "torch-fp32", "torch-bf16")


def mlx_worker(args) -> dict:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mobileo_mlx import backends, platform, processing
    from mobileo_mlx.pipeline import MobileO

    model = MobileO(args.folder, cpu_matmul=args.cpu_matmul)
    started = time.perf_counter()
    for name in ("vision", "projector", "language"):
        model.component(name)
    load_s = time.perf_counter() - started
    rss_loaded = common.rss_gb()
    matmul = common.mlx_matmul_gflops()
    picture = common.picture(args.size)
    prompt = processing.understanding_prompt(args.question)
    if {"on": True, "off": False}.get(args.warmup, platform.backend() != "cpu"):
        for _ in stream_generate(model.component("language"), model.tokenizer.hf, prompt=mx.array([], dtype=mx.uint32),
                                 input_embeddings=model.embed_prompt(prompt, picture)[0], max_tokens=2,
                                 sampler=make_sampler(temp=0.0)):
            pass
    peaks = {}

    common.mlx_reset_peak()
    t0 = time.perf_counter()
    features = model.image_features(picture)
    mx.eval(features)
    t_vision = time.perf_counter()
    peaks["vision"] = common.mlx_peak_gb()
    if not args.keep_loaded:  # what `mobileo-mlx ask` does (outside the timed stages)
        model.release(*model.PICTURE_COMPONENTS)
    model.image_features = lambda image: features  # embed_prompt reuses the features just timed
    embeddings = model.embed_prompt(prompt, picture)
    mx.eval(embeddings)
    t_embed = time.perf_counter()

    common.mlx_reset_peak()
    tokens, stamps = [], []
    with backends.stage():  # as MobileO.ask
        for response in stream_generate(model.component("language"), model.tokenizer.hf,
                                        prompt=mx.array([], dtype=mx.uint32), input_embeddings=embeddings[0],
                                        max_tokens=args.tokens, sampler=make_sampler(temp=0.0)):
            if response.finish_reason == "stop":  # the stop token: not part of the answer
                break
            stamps.append(time.perf_counter())
            tokens.append(int(response.token))
            last = response
    peaks["language"] = common.mlx_peak_gb()
    return {
        "side": "mlx", "dtype": str(model.dtype).split(".")[-1] + (
            ", bf16 CPU matmuls" if model.cpu_matmul == "bf16" and platform.backend() == "cpu" else ""), "device": platform.device_name(),
        "backend": platform.backend(), "load_s": load_s, "vision_s": t_vision - t0, "embed_s": t_embed - t_vision,
        "first_token_s": stamps[0] - t_embed, "ttft_s": stamps[0] - t0,
        "decode_s": stamps[-1] - stamps[0], "token_gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": tokens, "prompt_tokens": int(embeddings.shape[1]),
        "mlx_lm_generation_tps": last.generation_tps,
        "mlx_peak_gb": peaks, "rss_loaded_gb": rss_loaded, "peak_rss_gb": common.peak_rss_gb(),
        "matmul_gflops": matmul, "load": common.load_average(),
    }


def torch_worker(args) -> dict:
    torch, device = common.torch_setup()
    torch.set_grad_enabled(False)
    from tests.reference.pipeline_torch import template

    dtype = torch.float32 if args.worker == "torch-fp32" else torch.bfloat16
    started = time.perf_counter()
    ref = common.build_torch(Path(args.checkpoint), ("vision", "projector", "lm"), dtype, device)
    load_s = time.perf_counter() - started
    rss_loaded = common.rss_gb()
    matmul = common.torch_matmul_gflops(torch, device, dtype)
    picture = common.picture(args.size)
    text = template(f"<image>\n{args.question}")
    eos = ref.tokenizer.convert_tokens_to_ids("<|im_end|>")
    embed = ref.lm.get_input_embeddings()

    def features_of(image):
        pixels = ref.pixels(image).to(device=device, dtype=dtype)
        return ref.projector(ref.vision(pixels))[0]

    def embeddings_of(features):
        pieces, chunk = [], []
        for token in ref.token_ids(text) + [None]:
            if token is None or token == -200:
                if chunk:
                    pieces.append(embed(torch.tensor(chunk, device=device)))
                    chunk = []
                if token == -200:
                    pieces.append(features)
            else:
                chunk.append(token)
        return torch.cat(pieces)[None]

    def answer(embeds, max_tokens, stamps):
        out = ref.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]
        common.torch_sync(torch, device)
        stamps.append(time.perf_counter())
        cache = out.past_key_values
        while len(tokens) < max_tokens and tokens[-1] != eos:
            out = ref.lm(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            stamps.append(time.perf_counter())
        return tokens

    if {"on": True, "off": False}.get(args.warmup, device.type == "cuda"):
        answer(embeddings_of(features_of(picture)), 2, [])

    t0 = time.perf_counter()
    features = features_of(picture)
    common.torch_sync(torch, device)
    t_vision = time.perf_counter()
    embeds = embeddings_of(features)
    common.torch_sync(torch, device)
    t_embed = time.perf_counter()
    stamps: list[float] = []
    tokens = answer(embeds, args.tokens, stamps)
    if tokens and tokens[-1] == eos:  # mlx-lm does not yield the stop token; compare like with like
        tokens, stamps = tokens[:-1], stamps[:-1] or stamps
    return {
        "side": args.worker, "dtype": str(dtype).split(".")[-1], "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_s": load_s, "vision_s": t_vision - t0, "embed_s": t_embed - t_vision,
        "first_token_s": stamps[0] - t_embed, "ttft_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0],
        "token_gaps_s": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens, "prompt_tokens": int(embeds.shape[1]), "cuda_peak_gb": common.torch_peak_gb(torch, device),
        "rss_loaded_gb": rss_loaded, "peak_rss_gb": common.peak_rss_gb(), "matmul_gflops": matmul,
        "load": common.load_average(),
    }


def cost_stages(folder: Path, config: dict, prompt_tokens: int, size: int) -> list:
    lm = config["language"]
    layers = common.weight_bytes(folder, "language", exclude=("model.embed_tokens.", "lm_head."))["bytes"]
    head = common.weight_bytes(folder, "language")["bytes"] - layers  # embedding + head; decode reads the head
    head_only = head / 2 if not lm.get("tie_word_embeddings") else head
    vision = common.weight_bytes(folder, "vision")["bytes"] + common.weight_bytes(folder, "projector")["bytes"]
    d = int(lm["hidden_size"])
    kv = 2 * int(lm["num_hidden_layers"]) * int(lm["num_key_value_heads"]) * (d // int(lm["num_attention_heads"])) * 2
    return [
        common.Stage("vision encoder (FastViTHD + projector)", common.vision_flops(size), vision),
        common.Stage("prefill", common.lm_flops(lm, prompt_tokens, head_tokens=1), layers + head_only),
        common.Stage("decode, per token", common.lm_flops(lm, 1, prompt_tokens, head_tokens=1),
                     layers + head_only + kv * prompt_tokens),
    ]


def parent(args) -> int:
    checkpoint = common.full_checkpoint(args.rebuild)
    folder = common.converted(args.recipe, args.rebuild)
    config = json.loads((folder / "config.json").read_text())
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for side in sides:
        if side not in SIDES:
            raise SystemExit(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
    shared = ["--folder", str(folder), "--checkpoint", str(checkpoint), "--tokens", str(args.tokens),
              "--size", str(args.size), "--question", args.question, "--warmup", args.warmup,
              "--cpu-matmul", args.cpu_matmul] + (
        ["--keep-loaded"] if args.keep_loaded else [])
    print(f"machine: {json.dumps(common.machine())}")
    print(f"command: python -m benchmarks.ask {' '.join(sys.argv[1:])}"
          + (f"  (threads pinned to {args.threads})" if args.threads else ""))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    results = {side: common.run_worker("benchmarks.ask", side, shared) for side in sides}

    some = next(iter(results.values()))
    print()
    print(f"ask: {args.size}x{args.size} picture, {some['prompt_tokens']} prompt tokens (256 image tokens), "
          f"greedy answer of up to {args.tokens} tokens, recipe {args.recipe}")
    for side, r in results.items():
        print(f"  {side}: {r['device']} {r['dtype']}, load {r['load_s']:.1f} s, {len(r['tokens'])} tokens, "
              f"run at {r['load']}")

    def per_side(r):
        prefill = r["first_token_s"]
        gaps = r["token_gaps_s"]
        decode_tps = len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else None
        median_tps = 1 / statistics.median(gaps) if gaps else None
        return {"vision": r["vision_s"], "embed": r["embed_s"], "prefill": prefill,
                "prefill_tps": r["prompt_tokens"] / prefill, "ttft": r["ttft_s"], "decode_tps": decode_tps,
                "decode_median_tps": median_tps}

    stats = {side: per_side(r) for side, r in results.items()}
    headers = ["stage"]
    for side in sides:
        headers.append(side)
        if side != "mlx" and "mlx" in stats:
            headers.append(f"{side}/mlx")
    rows = []
    for key, label, unit, higher_better in (
        ("vision", "vision encoder s", "s", False), ("embed", "prompt embedding s", "s", False),
        ("prefill", "prefill + first token s", "s", False), ("prefill_tps", "prefill tokens/s", "tok/s", True),
        ("ttft", "time to first token s", "s", False), ("decode_tps", "decode tokens/s (mean)", "tok/s", True),
        ("decode_median_tps", "decode tokens/s (median gap)", "tok/s", True),
    ):
        row = [label]
        for side in sides:
            row.append(common.fmt(stats[side][key], 3 if unit == "s" else 1))
            if side != "mlx" and "mlx" in stats:
                a, b = stats[side][key], stats["mlx"][key]
                # ratio > 1 means MLX is better
                ratio = (b / a if higher_better else a / b) if a and b else None
                row.append("x" + common.fmt(ratio, 2))
        rows.append(row)
    print(common.table(headers, rows))
    print("(ratio columns: how many times better MLX is; > 1 = MLX faster)")
    print()
    rows = []
    for side, r in results.items():
        peak = r.get("mlx_peak_gb") or {}
        rows.append([side, common.fmt(peak.get("vision"), 2), common.fmt(peak.get("language"), 2),
                     common.fmt(r.get("cuda_peak_gb"), 2), common.fmt(r["rss_loaded_gb"], 2),
                     common.fmt(r["peak_rss_gb"], 2), common.fmt(r["matmul_gflops"], 1)])
    print(common.table(["side", "MLX peak vision GB", "MLX peak LM GB", "CUDA peak GB", "RSS after load GB",
                        "peak RSS GB", "matmul 1024^3 GFLOP/s"], rows))
    if "mlx" in results and "torch-fp32" in results:
        a, b = results["mlx"]["tokens"], results["torch-fp32"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note = "" if args.recipe == "none" else f" (recipe {args.recipe}: quantized, may differ)"
        print(f"greedy tokens mlx vs torch-fp32: first {same} of {len(a)}/{len(b)} identical{note}")
    print()

    stages = cost_stages(folder, config, some["prompt_tokens"], args.size)
    rows = [[s.name, common.fmt(s.flops / 1e9, 2), common.fmt(s.bytes / 1e9, 3)] for s in stages]
    print(f"cost model (recipe {args.recipe}; fp16 weights, quantized layers packed)")
    print(common.table(["stage", "GFLOP", "GB moved"], rows))
    rows = []
    for name, cores, tflops, gbps in common.APPLE_GPUS:
        t = common.predict_seconds(stages, tflops, gbps, args.compute_efficiency, args.bandwidth_efficiency)
        rows.append([f"{name} ({cores}-core GPU)", common.fmt(t[0], 3), common.fmt(t[1], 3),
                     common.fmt(t[0] + t[1], 3), common.fmt(1 / t[2], 0)])
    print(f"predicted = max(FLOPs / ({args.compute_efficiency:.0%} x peak), bytes / "
          f"({args.bandwidth_efficiency:.0%} x bandwidth)); embedding and sampling not modelled")
    print(common.table(["chip", "vision s", "prefill s", "TTFT s", "decode tok/s"], rows))
    print()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "stats": stats}, indent=1))
    m, f, b = (stats.get(s) for s in SIDES)
    print(f"ask: mlx TTFT {common.fmt(m and m['ttft'], 2)} s, {common.fmt(m and m['decode_tps'], 1)} tok/s vs "
          f"torch-fp32 TTFT {common.fmt(f and f['ttft'], 2)} s, {common.fmt(f and f['decode_tps'], 1)} tok/s, "
          f"torch-bf16 TTFT {common.fmt(b and b['ttft'], 2)} s, {common.fmt(b and b['decode_tps'], 1)} tok/s, "
          f"peak RSS mlx {common.fmt(results.get('mlx', {}).get('peak_rss_gb'), 2)} GB vs torch "
          f"{common.fmt(results.get('torch-fp32', {}).get('peak_rss_gb'), 2)} GB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ask", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=common.RECIPES, default="none",
                        help="Quantization recipe of the MLX side (default: none, the same weights as PyTorch).")
    parser.add_argument("--tokens", type=int, default=32, help="Answer length (greedy; default 32).")
    parser.add_argument("--size", type=int, default=1024, help="Picture size (default 1024).")
    parser.add_argument("--question", default=common.QUESTION)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Comma-separated subset of {', '.join(SIDES)}.")
    parser.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                        help="Answer once (2 tokens) before timing (auto: on GPUs only).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both sides (OpenBLAS / OpenMP / torch); default: the libraries' own.")
    parser.add_argument("--compute-efficiency", type=float, default=common.COMPUTE_EFFICIENCY)
    parser.add_argument("--bandwidth-efficiency", type=float, default=common.BANDWIDTH_EFFICIENCY)
    parser.add_argument("--keep-loaded", action="store_true",
                        help="Keep the vision tower loaded while the LM answers (default: free it once the "
                             "picture's features exist, as `mobileo-mlx ask` does).")
    parser.add_argument("--cpu-matmul", choices=("auto", "fp32", "bf16"), default="auto",
                        help="MLX side on the CPU: how the vision encoder, DiT and VAE multiply (as the CLI's "
                             "--cpu-matmul; auto: bf16 where the CPU has AVX512-BF16).")
    parser.add_argument("--rebuild", action="store_true", help="Rewrite the cached checkpoint and conversion.")
    parser.add_argument("--json", default=None, help="Also write every measurement to this file.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens < 1:
        raise SystemExit("--tokens must be at least 1")
    if args.worker is None:
        common.set_threads(args.threads)
        return parent(args)
    worker = {"mlx": mlx_worker, "torch-fp32": torch_worker, "torch-bf16": torch_worker}[args.worker]
    common.emit(worker(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
