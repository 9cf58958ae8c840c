"""Qwen2 language model (SPEC §2.3), built on mlx-lm's Qwen2 modules.

``LanguageModel`` *is* an ``mlx_lm.models.qwen2.Model``: its parameter names
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
from mlx_lm.models.qwen2 import MLP as Qwen2MLP
from mlx_lm.models.qwen2 import Attention as Qwen2Attention
from mlx_lm.models.qwen2 import Model as Qwen2ForCausalLM
from mlx_lm.models.qwen2 import ModelArgs as Qwen2Args

from . import activations


@dataclass
class LanguageConfig(Qwen2Args):
    """mlx-lm's Qwen2 ``ModelArgs`` with Qwen2-0.5B defaults (SPEC §1.1) and
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


class GatedMLP(Qwen2MLP):
    """mlx-lm's Qwen2 MLP (same parameters) with the gate from ``models.activations``:
    on CPU MLX's sigmoid is slow (SiLU gate of a 308-token prefill: 29 ms per layer with
    mlx-lm's ``swiglu``, 3.4 ms with ``glu_silu``); on GPUs it is the same built-in."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(activations.glu_silu(self.up_proj(x), self.gate_proj(x)))


def _additive_mask(mask, queries: int, keys: int) -> Optional[mx.array]:
    """mlx-lm's attention masks (None, "causal", boolean or additive arrays) as an additive
    float32 mask; "causal" aligns the last query with the last key (a prompt cache's offset)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        rows = mx.arange(keys - queries, keys)[:, None]
        return mx.where(rows >= mx.arange(keys)[None, :], 0.0, -mx.inf)
    if mask.dtype == mx.bool_:
        return mx.where(mask, 0.0, -mx.inf)
    return mask.astype(mx.float32)


# Above this many scores per image (heads x queries x keys; 64 MB in float32), a long prompt's
# masks and scores would cost memory: mlx-lm's fused call takes it.
FAST_ATTENTION_MAX_SCORES = 1 << 24


class FastAttention(Qwen2Attention):
    """mlx-lm's Qwen2 attention (same parameters, RoPE and cache handling) whose softmax
    attention over several query rows runs, on the CPU, through ``activations.attention_fast``:
    MLX's CPU ``scaled_dot_product_attention`` evaluates its exponentials with a scalar loop
    (14 heads x 308 x 308, a prefill's layer: 19.5 ms, 6.7 ms here). One query row
    (decoding), quantized KV caches, batched caches (a position per sequence: mlx-lm's batched
    prefill) and GPUs keep mlx-lm's call."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        batch, length, _ = x.shape
        offset = cache.offset if cache is not None else 0
        if (length == 1 or not activations.use_fast() or hasattr(cache, "bits") or not isinstance(offset, int)
                or self.n_heads * length * (offset + length) > FAST_ATTENTION_MAX_SCORES):
            return super().__call__(x, mask, cache)
        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = self._grouped_attention(queries, keys, values, mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def _grouped_attention(self, queries, keys, values, mask) -> mx.array:
        """Grouped-query attention as one attention per KV head: that head's query heads are
        stacked along the rows, [B, kv, rep * L, d], so keys and values are not repeated."""
        batch, heads, length, depth = queries.shape
        kv_heads, keys_length = keys.shape[1], keys.shape[2]
        repeats = heads // kv_heads
        additive = _additive_mask(mask, length, keys_length)
        if additive is not None:  # [B or 1, H, L, S] -> [B or 1, kv, rep * L, S], as the stacked rows
            lead = batch if additive.ndim == 4 and additive.shape[0] == batch else 1
            additive = mx.broadcast_to(additive, (lead, heads, length, keys_length))
            additive = additive.reshape(lead, kv_heads, repeats * length, keys_length)
        stacked = queries.reshape(batch, kv_heads, repeats * length, depth)
        output = activations.attention_fast(stacked, keys, values, self.scale, additive)
        return output.reshape(batch, heads, length, -1)


class LanguageModel(Qwen2ForCausalLM):
    """Qwen2 causal LM with ``embed`` and ``hidden_states`` entry points."""

    def __init__(self, config: LanguageConfig):
        super().__init__(config)
        self.config = config
        for layer in self.model.layers:
            layer.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
            layer.self_attn = FastAttention(config)

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
