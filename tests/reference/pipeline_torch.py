"""The Mobile-O pipelines in PyTorch, written from docs/reference-model.md §3, on the reference classes:
transformers' Qwen2ForCausalLM and slow Qwen2Tokenizer, diffusers' SanaTransformer2DModel,
AutoencoderDC and DPMSolverMultistepScheduler, and the test-side FastViTHD and MCP.

It reads an *original* checkpoint folder (model.safetensors, config.json, the slow tokenizer
files, transformer/ vae/ scheduler/ configs) exactly as the original code would, so the
end-to-end tests compare the runtime with a reference that never went through our converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fastvit_torch import FastViTHDReference, ReferenceConfig
from .mcp_torch import TorchMobileConditioningProjector

SYSTEM = "You are a helpful assistant."
VISION_PREFIX = "model.vision_tower.vision_tower.model."


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def template(message: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
            "<|im_start|>assistant\n")


class ReferenceMobileO:
    def __init__(self, folder: Path, vision: ReferenceConfig):
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)

        embed = state["model.embed_tokens.weight"]
        layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
        self.lm = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=embed.shape[0], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_hidden_layers=len(layer_ids),
            num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
            rope_theta=config["rope_theta"], rms_norm_eps=config["rms_norm_eps"],
            max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False,
            attn_implementation="eager",
        ))
        lm_state = {k: v for k, v in state.items()
                    if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))}
        self.lm.load_state_dict(lm_state, strict=True)

        self.vision = FastViTHDReference(vision)
        self.vision.load_state_dict(_sub(state, VISION_PREFIX), strict=True)
        self.image_size = int(config["mm_vision_tower"].rsplit("_", 1)[-1])

        projector = _sub(state, "model.mm_projector.")
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(*projector["0.weight"].shape[::-1]), torch.nn.GELU(),
            torch.nn.Linear(*projector["2.weight"].shape[::-1]))
        self.projector.load_state_dict(projector, strict=True)

        mcp = _sub(state, "model.diffusion_connector.fusion.")
        self.mcp = TorchMobileConditioningProjector(
            hidden_size=mcp["input_compress.0.weight"].shape[1], compress_dim=mcp["input_compress.0.weight"].shape[0],
            output_dim=mcp["output_proj.0.weight"].shape[0], num_layers=mcp["layer_weights"].shape[0],
            num_refiners=len({k.split(".")[1] for k in mcp if k.startswith("sequence_refiners.")}),
            reduction=mcp["input_compress.0.weight"].shape[0] // mcp["sequence_refiners.0.channel_attn.fc.0.weight"].shape[0],
        )
        self.mcp.load_state_dict(mcp, strict=True)

        self.dit = SanaTransformer2DModel.from_config(json.loads((folder / "transformer/config.json").read_text()))
        self.dit.load_state_dict(_sub(state, "model.dit."), strict=True)
        self.vae = AutoencoderDC.from_config(json.loads((folder / "vae/config.json").read_text()))
        self.vae.load_state_dict(_sub(state, "model.vae."), strict=True)
        self.scheduler_config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
        self.scheduler_cls = DPMSolverMultistepScheduler
        for module in (self.lm, self.vision, self.projector, self.mcp, self.dit, self.vae):
            module.eval()

    # --- prompt -> embeddings (tokenizer_image_token + prepare_inputs_labels_for_multimodal)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        from transformers import CLIPImageProcessorPil

        width, height = image.size
        side = max(width, height)
        square = Image.new("RGB", (side, side), (0, 0, 0))
        square.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": self.image_size}, crop_size={"height": self.image_size, "width": self.image_size},
            resample=Image.Resampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=[0, 0, 0], image_std=[1, 1, 1])
        return torch.from_numpy(processor(square, return_tensors="np")["pixel_values"])

    def token_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, chunk in enumerate(text.split("<image>")):
            if index:
                ids.append(-200)
            ids.extend(self.tokenizer(chunk).input_ids)
        return ids

    @torch.no_grad()
    def embeddings(self, text: str, image: Image.Image | None = None) -> torch.Tensor:
        ids = self.token_ids(text)
        embed = self.lm.get_input_embeddings()
        pieces, chunk = [], []
        for token in ids + [None]:
            if token is None or token == -200:
                if chunk:
                    pieces.append(embed(torch.tensor(chunk)))
                    chunk = []
                if token == -200:
                    pieces.append(self.projector(self.vision(self.pixels(image)))[0])
            else:
                chunk.append(token)
        return torch.cat(pieces)[None]

    # --- the pipelines -----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, message: str, noise: np.ndarray, steps: int, guidance: float,
                 image: Image.Image | None = None) -> np.ndarray:
        embeds = self.embeddings(template(message), image)
        hidden = self.lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        last = list(hidden[-self.mcp.layer_weights.shape[0]:])
        cond = self.mcp(last)
        uncond = self.mcp([torch.zeros_like(h) for h in last])
        context = torch.cat([uncond, cond])
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = torch.from_numpy(noise).float()
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents])
            velocity = self.dit(model_input, encoder_hidden_states=context, timestep=t.expand(2),
                                encoder_attention_mask=None, return_dict=False)[0]
            v_uncond, v_cond = velocity.chunk(2)
            latents = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, latents).prev_sample
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image01 = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        return (image01 * 255).round().astype(np.uint8)

    @torch.no_grad()
    def answer_tokens(self, message: str, max_new_tokens: int, image: Image.Image | None = None) -> list[int]:
        embeds = self.embeddings(template(message), image)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                               pad_token_id=eos)
        tokens = out[0].tolist()
        return tokens[: tokens.index(eos)] if eos in tokens else tokens
