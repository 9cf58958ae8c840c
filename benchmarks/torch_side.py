"""The PyTorch side: the reference pipeline built from the benchmark checkpoint, on the test-side
references (transformers' Qwen2, diffusers' SANA / DC-AE / DPM-Solver, ``tests/reference``'s
FastViTHD and MCP), in the side's dtype on the side's device.

torch is imported here only inside functions: only the PyTorch workers load it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from benchmarks import measure

SIDES = ("torch-fp32", "torch-bf16")
IMAGE_TOKEN = -200  # where the reference's token ids splice the picture's features in


def setup():
    """torch and the device (cuda if available, else cpu), autograd off, the thread count of
    ``--threads`` (inherited through OMP_NUM_THREADS)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.set_grad_enabled(False)
    return torch, device


def dtype_of(side: str):
    """``torch-fp32`` computes in float32, ``torch-bf16`` in bfloat16 (as the original inference script)."""
    import torch

    return {"torch-fp32": torch.float32, "torch-bf16": torch.bfloat16}[side]


def sync(torch, device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(torch, device, dtype, n: int = 1024) -> float:
    """Best-of-5 n^3 matmul GFLOP/s on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(torch, device)

    def product():
        a @ b
        sync(torch, device)

    return 2 * n**3 / measure.best_seconds(product, 5) / 1e9


def peak_gb(torch, device) -> float | None:
    """CUDA's peak allocation; None on the CPU (the process's RSS tells it there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def side_facts(torch, device, side: str) -> dict:
    """What every PyTorch worker reports about how it computes."""
    return {"side": side, "dtype": str(dtype_of(side)).split(".")[-1], "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


class Checkpoint:
    """Reads tensors of an original checkpoint on demand (safetensors, one at a time)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.file = safe_open(str(self.folder / "model.safetensors"), framework="pt")
        self.keys = list(self.file.keys())

    def shape(self, key: str) -> list[int]:
        return self.file.get_slice(key).get_shape()

    def state(self, prefix: str, dtype, strip: bool = True, exclude: tuple[str, ...] = ()) -> dict:
        out = {}
        for key in self.keys:
            if key.startswith(prefix) and not key.startswith(exclude):
                tensor = self.file.get_tensor(key)
                out[key[len(prefix):] if strip else key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return out


@contextlib.contextmanager
def no_init():
    """A context in which torch.nn.init fills nothing (the weights are loaded right after)."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def build(folder: Path, parts: tuple[str, ...], dtype, device, attn: str = "sdpa"):
    """A ``ReferenceMobileO`` (tests/reference/pipeline_torch.py) holding only ``parts``
    (any of lm, mcp, dit, vae, vision, projector), loaded from ``folder`` in ``dtype`` on
    ``device``. Built part by part: only what a benchmark uses is ever in memory (the VAE
    encoder is dropped before its weights are read), as on the MLX side."""
    import torch
    from transformers import AutoTokenizer

    from tests.reference.fastvit_torch import FastViTHDReference, ReferenceConfig
    from tests.reference.mcp_torch import TorchMobileConditioningProjector
    from tests.reference.pipeline_torch import VISION_PREFIX, ReferenceMobileO

    folder = Path(folder)
    ckpt = Checkpoint(folder)
    config = ckpt.config
    ref = ReferenceMobileO.__new__(ReferenceMobileO)
    ref.tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    ref.image_size = int(config["mm_vision_tower"].rsplit("_", 1)[-1])

    def place(module, state, strict=True):
        module.load_state_dict(state, strict=strict)
        return module.to(device=device, dtype=dtype).eval()

    if "vae" in parts:  # first: its encoder is built, then dropped before anything else is loaded
        from diffusers import AutoencoderDC

        with no_init():
            vae = AutoencoderDC.from_config(json.loads((folder / "vae/config.json").read_text()))
        vae.encoder = None
        ref.vae = place(vae, ckpt.state("model.vae.", dtype, exclude=("model.vae.encoder.",)))
    if "lm" in parts:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        layers = {int(k.split(".")[2]) for k in ckpt.keys if k.startswith("model.layers.")}
        with no_init():
            lm = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=ckpt.shape("model.embed_tokens.weight")[0], hidden_size=config["hidden_size"],
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
        compress = mcp["input_compress.0.weight"].shape
        module = TorchMobileConditioningProjector(
            hidden_size=compress[1], compress_dim=compress[0],
            output_dim=mcp["output_proj.0.weight"].shape[0], num_layers=mcp["layer_weights"].shape[0],
            num_refiners=len({k.split(".")[1] for k in mcp if k.startswith("sequence_refiners.")}),
            reduction=compress[0] // mcp["sequence_refiners.0.channel_attn.fc.0.weight"].shape[0],
        )
        ref.mcp = place(module, mcp)
    if "dit" in parts:
        from diffusers import SanaTransformer2DModel

        with no_init():
            dit = SanaTransformer2DModel.from_config(json.loads((folder / "transformer/config.json").read_text()))
        ref.dit = place(dit, ckpt.state("model.dit.", dtype))
    if "vision" in parts:
        with no_init():
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


def prompt_embeddings(ref, text: str, device, image_features=None):
    """``ReferenceMobileO.embeddings`` with the token ids on ``device`` (CUDA-safe) and the
    picture's features given (computed and timed apart) where the prompt has ``<image>``."""
    import torch

    embed = ref.lm.get_input_embeddings()
    pieces, chunk = [], []
    for token in ref.token_ids(text) + [None]:
        if token is None or token == IMAGE_TOKEN:
            if chunk:
                pieces.append(embed(torch.tensor(chunk, device=device)))
                chunk = []
            if token == IMAGE_TOKEN:
                pieces.append(image_features)
        else:
            chunk.append(token)
    return torch.cat(pieces)[None]


def image_features(ref, image, device, dtype):
    """The reference's FastViTHD + projector output for ``image``: [tokens, hidden]."""
    pixels = ref.pixels(image).to(device=device, dtype=dtype)
    return ref.projector(ref.vision(pixels))[0]
