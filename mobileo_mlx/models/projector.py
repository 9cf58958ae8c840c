"""``mlp2x_gelu`` multimodal projector (docs/reference-model.md §2.2): vision features -> LLM embeddings.

``Linear(mm_hidden_size, hidden_size) -> GELU (erf) -> Linear(hidden_size, hidden_size)``,
applied per token: 256 FastViTHD tokens of 3072 become 256 Qwen2 embeddings of 896.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs


@dataclass
class ProjectorConfig(BaseModelArgs):
    mm_hidden_size: int = 3072
    hidden_size: int = 896
    projector_type: str = "mlp2x_gelu"

    def __post_init__(self):
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported projector type {self.projector_type!r} (only mlp2x_gelu)")


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.mm_hidden_size, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, features: mx.array) -> mx.array:
        """``features`` [..., mm_hidden_size] -> [..., hidden_size]."""
        return self.linear_2(nn.gelu(self.linear_1(features)))
