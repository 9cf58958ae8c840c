"""Shared helpers of ``benchmarks.generate``, ``benchmarks.ask`` and ``benchmarks.quality``.

* the cached inputs: a full-size random checkpoint in the released layout
  (``<cache>/bench/checkpoint-full``, written once by ``mobileo_mlx.convert.demo``) and its
  conversions (``<cache>/bench/mlx-<recipe>``, one per quantization recipe);
* the shared inputs of both sides (prompt, question, seeded NCHW noise, a seeded picture);
* measuring: timers that synchronise, MLX peak memory, process peak RSS, the machine's load;
* workers: each side runs in its own process (``python -m benchmarks.X --worker SIDE``) and
  prints one JSON line, so peak RSS is per side;
* the PyTorch side, built from the checkpoint on the test-side references (transformers'
  Qwen2, diffusers' SANA / DC-AE / DPM-Solver, ``tests/reference`` FastViTHD and MCP), loading
  only the components a benchmark needs;
* the cost model: FLOPs and bytes per stage, and what they predict on Apple-silicon GPUs.

Import order matters: ``mobileo_mlx`` (BLAS routing) before ``mlx.core``; torch is imported
lazily, only by the PyTorch workers.
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)
import mlx.core as mx
import numpy as np

from mobileo_mlx import platform
from mobileo_mlx.convert import demo

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("none", "8", "4", "mixed")
GROUP_SIZE = 64
CHECKPOINT_SEED = 0

PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
QUESTION = "Describe this picture in detail."
NOISE_SEED = 42
PICTURE_SEED = 7


# ----------------------------------------------------------------------------------------------
# cached checkpoint and conversions


def bench_dir() -> Path:
    return platform.cache_dir() / "bench"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def full_checkpoint(rebuild: bool = False) -> Path:
    """The full-size random checkpoint (bf16, released layout), written once (~40 s, 3.3 GB)."""
    target = bench_dir() / "checkpoint-full"
    stamp = {"writer_version": demo.WRITER_VERSION, "dims": "full", "seed": CHECKPOINT_SEED, "dtype": "bfloat16"}
    if not rebuild and _read_json(target / "bench-stamp.json") == stamp:
        return target
    log(f"writing the full-size random checkpoint into {target} (once, ~3.3 GB)")
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    demo.write_checkpoint(staging, "full", seed=CHECKPOINT_SEED, dtype="bfloat16")
    (staging / "bench-stamp.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    log(f"  written in {time.perf_counter() - started:.0f} s")
    return target


def converted(recipe: str, rebuild: bool = False) -> Path:
    """The checkpoint converted with ``recipe`` (``python -m convert.from_torch``, once)."""
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    from mobileo_mlx.weights import FORMAT_VERSION

    source = full_checkpoint()
    target = bench_dir() / f"mlx-{recipe}"
    stamp = {"checkpoint": _read_json(source / "bench-stamp.json"), "recipe": recipe, "group_size": GROUP_SIZE,
             "format_version": FORMAT_VERSION}
    if not rebuild and _read_json(target / "bench-stamp.json") == stamp and (target / "config.json").is_file():
        return target
    log(f"converting the checkpoint with --quantize {recipe} into {target} (once)")
    started = time.perf_counter()
    command = [sys.executable, "-m", "convert.from_torch", str(source), "--output", str(target),
               "--quantize", recipe, "--group-size", str(GROUP_SIZE), "--force", "--quiet"]
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"conversion failed ({' '.join(command)})")
    (target / "bench-stamp.json").write_text(json.dumps(stamp))
    log(f"  converted in {time.perf_counter() - started:.0f} s")
    return target


# ----------------------------------------------------------------------------------------------
# shared inputs


def noise(model_config: dict, size: int = 512, seed: int = NOISE_SEED) -> np.ndarray:
    """The initial latent, NCHW float32 (the reference layout), identical on every side."""
    vae = model_config["vae"]
    cells = size // 2 ** (len(vae["block_out_channels"]) - 1)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, int(vae["latent_channels"]), cells, cells)).astype(np.float32)


def picture(size: int = 1024, seed: int = PICTURE_SEED):
    """A seeded synthetic photo-like RGB picture (smooth gradients + noise), PIL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(5 * x * y + 2)], -1) * 90 + 128
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# measuring


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load n/a"


def peak_rss_gb() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def rss_gb() -> float:
    """Current RSS (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return peak_rss_gb()


def mlx_peak_gb() -> float:
    return mx.get_peak_memory() / 2**30


def mlx_reset_peak() -> None:
    mx.reset_peak_memory()


def machine() -> dict:
    """What ran the numbers: MLX backend/device, CPU, cores, load."""
    return {
        "backend": platform.backend(),
        "device": platform.device_name(),
        "cpu": _platform.processor() or _platform.machine(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "load": load_average(),
    }


def mlx_matmul_gflops(dtype=None, n: int = 1024) -> float:
    """Best-of-5 n^3 matmul GFLOP/s on the MLX default device in ``dtype`` (the compute dtype)."""
    dtype = dtype or platform.compute_dtype()
    a = mx.random.normal((n, n), key=mx.random.key(0)).astype(dtype)
    b = mx.random.normal((n, n), key=mx.random.key(1)).astype(dtype)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def mlx_copy_gbps(mib: int = 256) -> float:
    """Best-of-3 copy bandwidth (read + write) on the MLX default device, GB/s."""
    x = mx.zeros((mib * 2**20 // 4,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mx.eval(x + 1)
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best / 1e9


# ----------------------------------------------------------------------------------------------
# workers (one process per side)


def run_worker(module: str, side: str, args: list[str], timeout: float | None = None) -> dict:
    """``python -m <module> --worker <side> <args>``; its last stdout line is a JSON object."""
    command = [sys.executable, "-m", module, "--worker", side, *args]
    log(f"[{side}] {' '.join(command[1:])}  ({load_average()})")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"[{side}] worker failed with exit code {result.returncode}")
    data = json.loads(lines[-1])
    data.setdefault("wall_s", time.perf_counter() - started)
    log(f"[{side}] done in {time.perf_counter() - started:.0f} s  ({load_average()})")
    return data


def set_threads(threads: int | None) -> None:
    """Pin the CPU thread count of both sides (OpenBLAS under MLX, OpenMP / intra-op under torch);
    the workers inherit the environment. ``None`` leaves the libraries' defaults."""
    if threads:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)


def emit(result: dict) -> None:
    """A worker's answer: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# the PyTorch side


def torch_setup():
    """torch and the device (cuda if available, else cpu)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return torch, device


def torch_sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_matmul_gflops(torch, device, dtype, n: int = 1024) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    torch_sync(torch, device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        torch_sync(torch, device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def torch_peak_gb(torch, device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None


class TorchCheckpoint:
    """Reads tensors of an original checkpoint on demand (safetensors, one at a time)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self._file = safe_open(str(self.folder / "model.safetensors"), framework="pt")
        self.keys = list(self._file.keys())

    def state(self, prefix: str, dtype, strip: bool = True, exclude: tuple[str, ...] = ()) -> dict:
        out = {}
        for key in self.keys:
            if key.startswith(prefix) and not key.startswith(exclude):
                tensor = self._file.get_tensor(key)
                out[key[len(prefix):] if strip else key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return out


def _no_init():
    """A context in which torch.nn.init fills nothing (the weights are loaded right after)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def context():
        names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.nn.init, n, f)

    return context()


def build_torch(folder: Path, parts: tuple[str, ...], dtype, device, attn: str = "sdpa"):
    """A ``ReferenceMobileO`` (tests/reference/pipeline_torch.py) holding only ``parts``
    (any of lm, mcp, dit, vae, vision, projector), loaded from ``folder`` in ``dtype`` on
    ``device``. Built part by part: only what a benchmark uses is ever in memory (the VAE
    encoder is dropped before its weights are read), as on the MLX side."""
    torch, _ = torch_setup()
    from tests.reference.fastvit_torch import FastViTHDReference, ReferenceConfig
    from tests.reference.mcp_torch import TorchMobileConditioningProjector
    from tests.reference.pipeline_torch import VISION_PREFIX, ReferenceMobileO

    ckpt = TorchCheckpoint(folder)
    config = ckpt.config
    ref = ReferenceMobileO.__new__(ReferenceMobileO)
    from transformers import AutoTokenizer

    ref.tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    ref.image_size = int(config["mm_vision_tower"].rsplit("_", 1)[-1])

    def place(module, state, strict=True):
        module.load_state_dict(state, strict=strict)
        return module.to(device=device, dtype=dtype).eval()

    if "vae" in parts:  # first: its encoder is built, then dropped before anything else is loaded
        from diffusers import AutoencoderDC

        with _no_init():
            vae = AutoencoderDC.from_config(json.loads((folder / "vae/config.json").read_text()))
        vae.encoder = None
        ref.vae = place(vae, ckpt.state("model.vae.", dtype, exclude=("model.vae.encoder.",)))
    if "lm" in parts:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        embed_shape = ckpt._file.get_slice("model.embed_tokens.weight").get_shape()
        layers = {int(k.split(".")[2]) for k in ckpt.keys if k.startswith("model.layers.")}
        with _no_init():
            lm = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=embed_shape[0], hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"], num_hidden_layers=len(layers),
                num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
                rope_theta=config["rope_theta"], rms_norm_eps=config["rms_norm_eps"],
                max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False,
                attn_implementation=attn,
            ))
        state = {}
        for prefix in ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."):
            state.update(ckpt.state(prefix, dtype, strip=False))
        ref.lm = place(lm, state)
    if "mcp" in parts:
        mcp = ckpt.state("model.diffusion_connector.fusion.", torch.float32)
        module = TorchMobileConditioningProjector(
            hidden_size=mcp["input_compress.0.weight"].shape[1], compress_dim=mcp["input_compress.0.weight"].shape[0],
            output_dim=mcp["output_proj.0.weight"].shape[0], num_layers=mcp["layer_weights"].shape[0],
            num_refiners=len({k.split(".")[1] for k in mcp if k.startswith("sequence_refiners.")}),
            reduction=mcp["input_compress.0.weight"].shape[0] // mcp["sequence_refiners.0.channel_attn.fc.0.weight"].shape[0],
        )
        ref.mcp = place(module, mcp)
    if "dit" in parts:
        from diffusers import SanaTransformer2DModel

        with _no_init():
            dit = SanaTransformer2DModel.from_config(json.loads((folder / "transformer/config.json").read_text()))
        ref.dit = place(dit, ckpt.state("model.dit.", dtype))
    if "vision" in parts:
        with _no_init():
            vision = FastViTHDReference(ReferenceConfig())  # the released FastViTHD sizes
        ref.vision = place(vision, ckpt.state(VISION_PREFIX, dtype))
    if "projector" in parts:
        projector = ckpt.state("model.mm_projector.", dtype)
        module = torch.nn.Sequential(
            torch.nn.Linear(*projector["0.weight"].shape[::-1]), torch.nn.GELU(),
            torch.nn.Linear(*projector["2.weight"].shape[::-1]))
        ref.projector = place(module, projector)
    from diffusers import DPMSolverMultistepScheduler

    ref.scheduler_config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    ref.scheduler_cls = DPMSolverMultistepScheduler
    return ref


# ----------------------------------------------------------------------------------------------
# cost model: FLOPs (2 x MAC, as torch.utils.flop_counter counts) and bytes per stage


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


def vae_decode_flops(vae: dict, size: int = 512) -> float:
    """DC-AE decoder FLOPs for one ``size``^2 image (convs, linears, LiteMLA attention)."""
    widths = list(vae["block_out_channels"])
    layers = vae.get("layers_per_block") or vae.get("decoder_layers_per_block")
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(widths)
    types = vae.get("block_types") or vae.get("decoder_block_types")
    types = list(types) if isinstance(types, (list, tuple)) else [types] * len(widths)
    scales = vae.get("qkv_multiscales") or vae.get("decoder_qkv_multiscales") or [[]] * len(widths)
    head_dim = int(vae.get("attention_head_dim", 32))
    latent = int(vae["latent_channels"])
    stages = len(widths)
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
                for k in scales[i]:
                    total += 2 * hw * 3 * c * k * k + 2 * hw * 3 * c * 3 * head_dim  # dw kxk, grouped 1x1
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


VISION_FLOPS_1024 = 0.49e12  # FastViTHD at 1024^2 (SPEC §4, torch.utils.flop_counter)


def vision_flops(size: int = 1024) -> float:
    return VISION_FLOPS_1024 * (size / 1024) ** 2


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
    layers = vae.get("layers_per_block") or [3] * len(widths)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(widths)
    types = vae.get("block_types") or ["ResBlock"] * len(widths)
    types = list(types) if isinstance(types, (list, tuple)) else [types] * len(widths)
    stages = len(widths)
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


@dataclass
class Stage:
    name: str
    flops: float
    bytes: float
    repeat: int = 1  # how many times it runs (DiT steps)


def predict_seconds(stages: list[Stage], tflops: float, gbps: float,
                    compute_eff: float = COMPUTE_EFFICIENCY, bandwidth_eff: float = BANDWIDTH_EFFICIENCY) -> list[float]:
    """Roofline per stage: max(FLOPs / (eff x peak), bytes / (eff x bandwidth)) x repeats."""
    return [
        s.repeat * max(s.flops / (compute_eff * tflops * 1e12), s.bytes / (bandwidth_eff * gbps * 1e9))
        for s in stages
    ]


# ----------------------------------------------------------------------------------------------
# printing


def fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                                for w, a in zip(widths, align)) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                       for c, w, a in zip(row, widths, align)) + " |")
    return "\n".join(lines)
