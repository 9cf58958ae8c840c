"""The released Mobile-O checkpoint's layout: where its files are and what they are called.

The hub repo holds the weights either at its root or in ``final_merged_model_23620/``;
the converter reads either.
"""

from __future__ import annotations

import re

MERGED_SUBFOLDER = "final_merged_model_23620"
MOBILEO_MODEL_TYPES = ("mobileo_inference", "mobile_o_inference")
DEFAULT_DIFFUSION_REPO = "Efficient-Large-Model/Sana_600M_512px_diffusers"

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"

# Copied next to the converted weights when present (tokenizer.json is written
# fresh when the checkpoint has none).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

# diffusers layout: config section -> (subfolder, file name)
DIFFUSION_CONFIG_FILES = {
    "transformer": ("transformer", "config.json"),
    "vae": ("vae", "config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))
