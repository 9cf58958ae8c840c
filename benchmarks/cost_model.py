"""The cost model: FLOPs (2 x MAC, as torch.utils.flop_counter counts) and bytes moved per stage,
and the seconds they imply on Apple-silicon GPUs (roofline: compute or bandwidth, whichever binds)
and on the machine that ran the benchmark (from its measured matmul and copy rates).

Pure Python: the configs are the converted folder's ``config.json`` sections, the weight bytes are
read from the safetensors headers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Apple-silicon GPUs: (name, GPU cores, fp16 TFLOP/s, memory GB/s). fp16 runs at the fp32 rate on
# Apple GPUs (philipturner/metal-benchmarks: "F16 is neither faster nor slower than F32"), so the
# fp16 figure is Apple's fp32 figure where Apple published one (M1, M2 families), otherwise
# cores x 128 ALUs x 2 FLOP x the GPU clock (M3: 1.398 GHz, M4: 1.47 GHz). Bandwidths: Apple's specs.
APPLE_GPUS = (
    ("M1", 8, 2.6, 68.25),
    ("M1 Pro", 16, 5.2, 200),
    ("M1 Max", 32, 10.4, 400),
    ("M2", 10, 3.6, 100),
    ("M2 Pro", 19, 6.8, 200),
    ("M2 Max", 38, 13.6, 400),
    ("M3", 10, 3.6, 100),
    ("M3 Pro", 18, 6.4, 150),
    ("M3 Max", 40, 14.3, 400),
    ("M4", 10, 3.8, 120),
    ("M4 Pro", 20, 7.5, 273),
    ("M4 Max", 40, 15.1, 546),
)
COMPUTE_EFFICIENCY = 0.5  # fraction of peak FLOP/s MLX reaches on these stages (assumption)
BANDWIDTH_EFFICIENCY = 0.7  # fraction of peak bandwidth reached by streaming kernels (assumption)

VISION_FLOPS_1024 = 0.49e12  # FastViTHD at 1024^2 (docs/reference-model.md §4, torch.utils.flop_counter)


# ----------------------------------------------------------------------------------------------
# FLOPs


def dit_forward_flops(dit: dict, batch: int, tokens: int, caption: int, hoisted: bool = False) -> float:
    """One SANA forward (diffusers' work; ``hoisted`` leaves out the caption projection and the
    cross-attention K/V, which the MLX pipeline computes once per generation)."""
    d = int(dit["num_attention_heads"]) * int(dit["attention_head_dim"])
    heads, hd = int(dit["num_attention_heads"]), int(dit["attention_head_dim"])
    ffn = int(round(d * float(dit.get("mlp_ratio", 2.5))))
    n, s = tokens, caption
    block = (
        8 * n * d * d  # q, k, v, out projections of the linear self-attention
        + heads * (4 * n * hd * hd + 4 * n * hd)  # ReLU linear attention (kv, out, normaliser)
        + 4 * n * d * d + 4 * n * s * d  # cross-attention q / out, scores, weighted values
        + 2 * n * d * 2 * ffn + 2 * n * 2 * ffn * 9 + 2 * n * ffn * d  # GLUMBConv
    )
    if not hoisted:
        block += 4 * s * d * d  # cross-attention k, v
    caption_channels = int(dit["caption_channels"])
    extra = 2 * n * int(dit["in_channels"]) * d + 2 * n * d * int(dit["out_channels"])
    extra += 2 * (256 * d + d * d + d * 6 * d)  # timestep embedder
    if not hoisted:
        extra += 2 * s * (caption_channels * d + d * d)  # caption projection
    return batch * (int(dit["num_layers"]) * block + extra)


def _per_stage(vae: dict, names: tuple[str, ...], default, stages: int) -> list:
    """A per-stage DC-AE setting under any of ``names``, one value broadcast to every stage."""
    value = next((vae[name] for name in names if vae.get(name)), default)
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


def vae_decode_flops(vae: dict, size: int = 512) -> float:
    """DC-AE decoder FLOPs for one ``size``^2 image (convs, linears, LiteMLA attention)."""
    widths = list(vae["block_out_channels"])
    stages = len(widths)
    layers = _per_stage(vae, ("layers_per_block", "decoder_layers_per_block"), None, stages)
    types = _per_stage(vae, ("block_types", "decoder_block_types"), None, stages)
    scales = vae.get("qkv_multiscales") or vae.get("decoder_qkv_multiscales") or [[]] * stages
    head_dim = int(vae.get("attention_head_dim", 32))
    latent = int(vae["latent_channels"])
    side = size // 2 ** (stages - 1)
    total = 18 * side * side * latent * widths[-1]  # conv_in 3x3
    for i in reversed(range(stages)):
        if i < stages - 1:
            side *= 2
            total += 18 * side * side * widths[i + 1] * widths[i]  # upsample: 3x3 conv
        hw, c = side * side, widths[i]
        for _ in range(int(layers[i])):
            if types[i] == "ResBlock":
                total += 36 * hw * c * c
            else:
                branches = 1 + len(scales[i])
                total += 6 * hw * c * c  # q, k, v
                for k in scales[i]:  # q, k, v together: depthwise kxk, then 1x1 in groups of head_dim
                    total += 2 * hw * 3 * c * k * k + 2 * hw * 3 * c * head_dim
                heads = branches * c // head_dim
                total += heads * 4 * hw * head_dim * (head_dim + 1)  # linear attention (padded v)
                total += 2 * hw * branches * c * c  # to_out
                total += 2 * hw * c * 8 * c + 2 * hw * 8 * c * 9 + 2 * hw * 4 * c * c  # GLUMBConv x4
    total += 18 * size * size * widths[0] * 3  # conv_out
    return float(total)


def lm_flops(language: dict, tokens: int, context: int = 0, head_tokens: int = 0) -> float:
    """Qwen2 FLOPs for ``tokens`` new tokens after ``context`` cached ones (+ the head on
    ``head_tokens`` positions)."""
    d, inter = int(language["hidden_size"]), int(language["intermediate_size"])
    heads, kv = int(language["num_attention_heads"]), int(language["num_key_value_heads"])
    hd = d // heads
    per_token = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    attention = 0
    for position in range(context, context + tokens):  # QK^T and AV over the visible keys
        attention += 4 * heads * hd * (position + 1)
    vocab = int(language.get("vocab_size", 151649))
    return float(int(language["num_hidden_layers"]) * (tokens * per_token + attention) + head_tokens * 2 * d * vocab)


def vision_flops(size: int = 1024) -> float:
    return VISION_FLOPS_1024 * (size / 1024) ** 2


# ----------------------------------------------------------------------------------------------
# bytes


def weight_bytes(folder: Path, component: str, runtime_float_bytes: int = 2, exclude: tuple[str, ...] = ()) -> dict:
    """Bytes of ``component``'s weights as a GPU holds them: quantized tensors (packed uint32)
    as stored, floating-point tensors at ``runtime_float_bytes`` (fp16 on GPUs)."""
    path = Path(folder) / f"{component}.safetensors"
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total, params = 0, 0
    for name, entry in header.items():
        if name == "__metadata__" or name.startswith(exclude):
            continue
        count = math.prod(entry["shape"])
        if entry["dtype"] in ("U32", "I32", "U8", "I64"):
            total += count * {"U32": 4, "I32": 4, "U8": 1, "I64": 8}[entry["dtype"]]
        else:
            total += count * runtime_float_bytes
        params += count
    return {"bytes": total, "tensors_values": params}


def dit_activation_bytes(dit: dict, batch: int, tokens: int, caption: int, elem: int = 2) -> float:
    """Activation traffic of one DiT forward, counting every op's inputs and outputs once
    (no fusion): about 67 token-width tensors per block (see the README)."""
    d = int(dit["num_attention_heads"]) * int(dit["attention_head_dim"])
    per_block = 67 * tokens * d + 2 * caption * d
    return float(batch * int(dit["num_layers"]) * per_block * elem)


def vae_activation_bytes(vae: dict, size: int = 512, elem: int = 2) -> float:
    """Activation traffic of the DC-AE decode: ~33 tensor passes per ResBlock, ~131 per
    EfficientViT block, ~7 per upsampler, at each stage's width and resolution."""
    widths = list(vae["block_out_channels"])
    stages = len(widths)
    layers = _per_stage(vae, ("layers_per_block",), 3, stages)
    types = _per_stage(vae, ("block_types",), "ResBlock", stages)
    side = size // 2 ** (stages - 1)
    total = 0.0
    for i in reversed(range(stages)):
        if i < stages - 1:
            side *= 2
            total += side * side * (5 * widths[i] + 2.25 * widths[i + 1])
        per = 33 if types[i] == "ResBlock" else 131
        total += int(layers[i]) * per * side * side * widths[i]
    total += 6 * size * size * widths[0]
    return total * elem


# ----------------------------------------------------------------------------------------------
# the stages of each benchmark


@dataclass
class Stage:
    name: str
    flops: float
    bytes: float
    repeat: int = 1  # how many times it runs (DiT steps)


def generation_stages(folder: Path, config: dict, prompt_tokens: int, steps: int, size: int) -> tuple[list, dict]:
    """``benchmarks.generate``'s stages as an Apple GPU runs them (fp16 activations and weights,
    quantized layers packed), and the weight bytes per component."""
    cells = size // 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    tokens = cells * cells
    weights = {c: weight_bytes(folder, c)["bytes"] for c in ("language", "mcp", "dit", "vae")}
    # Generation reads every LM layer, but only a few embedding rows and never the head.
    lm_layers = weight_bytes(folder, "language", exclude=("model.embed_tokens.", "lm_head."))["bytes"]
    mcp_values = weight_bytes(folder, "mcp")["tensors_values"]
    hidden = int(config["language"]["hidden_size"])
    llm_act = 2 * prompt_tokens * hidden * 2 * 12 * int(config["language"]["num_hidden_layers"])
    stages = [
        Stage("LLM + MCP (prefill, all hidden states)",
              lm_flops(config["language"], prompt_tokens) + 2 * 2 * prompt_tokens * mcp_values,
              lm_layers + weights["mcp"] + llm_act),
        Stage("DiT step (CFG, batch 2)", dit_forward_flops(config["dit"], 2, tokens, prompt_tokens, True),
              weights["dit"] + dit_activation_bytes(config["dit"], 2, tokens, prompt_tokens), steps),
        Stage("VAE decode", vae_decode_flops(config["vae"], size),
              weights["vae"] + vae_activation_bytes(config["vae"], size)),
    ]
    return stages, weights


def understanding_stages(folder: Path, config: dict, prompt_tokens: int, size: int) -> list:
    """``benchmarks.ask``'s stages: the vision encoder, the prefill, one decoded token."""
    lm = config["language"]
    layers = weight_bytes(folder, "language", exclude=("model.embed_tokens.", "lm_head."))["bytes"]
    head = weight_bytes(folder, "language")["bytes"] - layers  # embedding + head; decode reads the head
    head_only = head / 2 if not lm.get("tie_word_embeddings") else head
    vision = weight_bytes(folder, "vision")["bytes"] + weight_bytes(folder, "projector")["bytes"]
    d = int(lm["hidden_size"])
    kv = 2 * int(lm["num_hidden_layers"]) * int(lm["num_key_value_heads"]) * (d // int(lm["num_attention_heads"])) * 2
    return [
        Stage("vision encoder (FastViTHD + projector)", vision_flops(size), vision),
        Stage("prefill", lm_flops(lm, prompt_tokens, head_tokens=1), layers + head_only),
        Stage("decode, per token", lm_flops(lm, 1, prompt_tokens, head_tokens=1),
              layers + head_only + kv * prompt_tokens),
    ]


# ----------------------------------------------------------------------------------------------
# predictions


def predict_seconds(stages: list[Stage], tflops: float, gbps: float, compute_eff: float = COMPUTE_EFFICIENCY,
                    bandwidth_eff: float = BANDWIDTH_EFFICIENCY) -> list[float]:
    """Roofline per stage: max(FLOPs / (eff x peak), bytes / (eff x bandwidth)) x repeats."""
    return [
        s.repeat * max(s.flops / (compute_eff * tflops * 1e12), s.bytes / (bandwidth_eff * gbps * 1e9))
        for s in stages
    ]


def apple_predictions(stages: list[Stage], compute_eff: float = COMPUTE_EFFICIENCY,
                      bandwidth_eff: float = BANDWIDTH_EFFICIENCY) -> list[tuple[str, float, float, list[float]]]:
    """(chip, fp16 TFLOP/s, GB/s, seconds per stage) for every GPU of ``APPLE_GPUS``."""
    return [(f"{name} ({cores}-core GPU)", tflops, gbps,
             predict_seconds(stages, tflops, gbps, compute_eff, bandwidth_eff))
            for name, cores, tflops, gbps in APPLE_GPUS]


def machine_prediction(stages: list[Stage], matmul_gflops: float, copy_gbps: float) -> tuple[float, float, list[float]]:
    """(TFLOP/s, GB/s, seconds per stage) on the machine that measured these rates; efficiency 1,
    since they are achieved rates, not peaks."""
    tflops = matmul_gflops / 1e3
    return tflops, copy_gbps, predict_seconds(stages, tflops, copy_gbps, 1.0, 1.0)
