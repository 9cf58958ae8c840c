"""Qwen2 language model (docs/reference-model.md §2.3): mlx-lm's Qwen2 ``Model``.

``LanguageModel`` *is* an ``mlx_lm.models.qwen2.Model``: its modules, parameter names
(``model.embed_tokens``, ``model.layers.N...``, ``model.norm``, ``lm_head``),
its ``__call__(inputs, cache=None, input_embeddings=None) -> logits``, its
``layers`` and ``sanitize`` are mlx-lm's, so it works unchanged with
``mlx_lm.generate.generate_step`` / ``stream_generate`` (including their
``input_embeddings=`` argument) and with mlx-lm prompt caches.

Mobile-O adds two entry points:

* ``embed(ids)``: token embeddings, into which image features are spliced;
* ``hidden_states(input_embeddings, mask=None)``: the ``num_layers + 1``
  hidden states exactly as transformers' ``output_hidden_states`` returns them,
  ``[embeddings, out_1, ..., out_{n-1}, norm(out_n)]`` (the last entry is the
  final-norm output), without computing logits. The image-generation path
  feeds the last four to the Mobile Conditioning Projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.qwen2 import Model as Qwen2ForCausalLM
from mlx_lm.models.qwen2 import ModelArgs as Qwen2Args


@dataclass
class LanguageConfig(Qwen2Args):
    """mlx-lm's Qwen2 ``ModelArgs`` with Qwen2-0.5B defaults (docs/reference-model.md §1.2) and
    the special token ids. ``from_dict`` ignores unknown keys."""

    model_type: str = "qwen2"
    hidden_size: int = 896
    num_hidden_layers: int = 24
    intermediate_size: int = 4864
    num_attention_heads: int = 14
    rms_norm_eps: float = 1e-6
    vocab_size: int = 151649
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[Union[int, List[int]]] = 151645


class LanguageModel(Qwen2ForCausalLM):
    """Qwen2 causal LM with ``embed`` and ``hidden_states`` entry points."""

    def __init__(self, config: LanguageConfig):
        super().__init__(config)
        self.config = config

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings ``[..., hidden_size]`` of integer ``ids``."""
        return self.model.embed_tokens(ids)

    def hidden_states(
        self, input_embeddings: mx.array, mask: Optional[Union[mx.array, str]] = None
    ) -> List[mx.array]:
        """All hidden states of ``input_embeddings`` ``[B, L, hidden_size]``.

        Returns ``num_hidden_layers + 1`` arrays ``[B, L, hidden_size]``:
        the embeddings, the outputs of layers 1 .. n-1 and the final-norm
        output of layer n, as transformers' ``output_hidden_states``.

        ``mask``: ``None`` for plain causal attention (what the reference runs);
        a ``[B, L]`` keep-mask (1/True = real token, 0/False = padding, as
        transformers' ``attention_mask``) combined with the causal mask, where
        real tokens never see padding and the states at padded positions are
        unspecified (but finite); or anything mlx-lm's attention accepts
        (``"causal"``, a boolean or additive array broadcastable to
        ``[B, heads, L, L]``), passed on unchanged.
        """
        attention_mask = self._attention_mask(input_embeddings, mask)
        states = [input_embeddings]
        h = input_embeddings
        for layer in self.model.layers:
            h = layer(h, attention_mask)
            states.append(h)
        states[-1] = self.model.norm(h)
        return states

    @staticmethod
    def _attention_mask(
        input_embeddings: mx.array, mask: Optional[Union[mx.array, str]]
    ) -> Optional[Union[mx.array, str]]:
        if mask is None:
            return create_attention_mask(input_embeddings)
        if isinstance(mask, mx.array) and mask.ndim == 2:
            length = input_embeddings.shape[1]
            positions = mx.arange(length)
            causal = positions[:, None] >= positions[None, :]  # [L, L]
            itself = positions[:, None] == positions[None, :]
            keep = mask.astype(mx.bool_)[:, None, None, :]  # [B, 1, 1, L]
            # Every row keeps at least its own position: a fully masked row
            # would give NaN, which later layers would spread through the
            # (zero-weighted) padded values.
            return causal & (keep | itself)
        return mask
