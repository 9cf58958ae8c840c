"""Qwen2 language model: checkpoint names -> mlx-lm Qwen2 names (docs/reference-model.md §1.1, §1.3, §2.3).

The checkpoint keeps transformers' ``Qwen2ForCausalLM`` names
(``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``),
which are also mlx-lm's, so every tensor is copied under its own name.

This module also owns the stale PEFT duplicates ``base_model.*`` that
``merge_lora`` leaves in the released file (docs/reference-model.md §1.1), and drops them, as
``from_pretrained`` does. Precomputed ``rotary_emb.inv_freq`` buffers (older
transformers checkpoints) are dropped too: the runtime computes RoPE itself.
"""

from __future__ import annotations

import re
from typing import Mapping

from mobileo_mlx.convert.mapping import Rule, convert_with_rules

KEYS = re.compile(r"model\.(?:embed_tokens|layers|norm)\.|lm_head\.|base_model\.")
IGNORE = re.compile(r"base_model\.|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

RULES = (
    Rule(r"(model\.embed_tokens\.weight)", r"\1"),
    Rule(
        r"(model\.layers\.\d+\."
        r"(?:self_attn\.[qkv]_proj\.(?:weight|bias)"
        r"|self_attn\.o_proj\.weight"
        r"|mlp\.(?:gate|up|down)_proj\.weight"
        r"|(?:input|post_attention)_layernorm\.weight))",
        r"\1",
    ),
    Rule(r"(model\.norm\.weight)", r"\1"),
    Rule(r"(lm_head\.weight)", r"\1"),
)

# The checkpoint's config.json: Qwen2Config plus LLaVA / Mobile-O fields.
CHECKPOINT_MODEL_TYPES = {"mobileo_inference", "mobile_o_inference", "qwen2", "llava_qwen2"}

# Qwen2-0.5B values (docs/reference-model.md §1.1), used where config.json lacks a field.
DEFAULTS = {
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def config_from_checkpoint(
    shapes: Mapping[str, tuple], checkpoint_config: Mapping, diffusers_config=None
) -> dict:
    """The ``LanguageConfig`` dict: sizes from the tensors, the rest from config.json."""
    model_type = checkpoint_config.get("model_type")
    if model_type is not None and model_type not in CHECKPOINT_MODEL_TYPES:
        raise ValueError(
            f"unexpected checkpoint model_type {model_type!r}; "
            f"expected one of {sorted(CHECKPOINT_MODEL_TYPES)}"
        )

    vocab_size, hidden_size = shapes["model.embed_tokens.weight"]
    layer_indices = {int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name))}
    if not layer_indices or layer_indices != set(range(max(layer_indices) + 1)):
        raise ValueError(f"language layers are missing or not contiguous: {sorted(layer_indices)}")
    num_hidden_layers = len(layer_indices)
    intermediate_size = shapes["model.layers.0.mlp.gate_proj.weight"][0]

    def field(name):
        value = checkpoint_config.get(name)
        return DEFAULTS[name] if value is None else value

    def count(name):
        value = field(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.json: {name} must be an integer >= 1, not {value!r}")
        return value

    def positive(name):
        value = field(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"config.json: {name} must be a number > 0, not {value!r}")
        return float(value)

    num_attention_heads = count("num_attention_heads")
    num_key_value_heads = count("num_key_value_heads")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"config.json: num_attention_heads {num_attention_heads} does not divide the hidden size {hidden_size}"
        )
    head_dim = hidden_size // num_attention_heads
    query_width = shapes["model.layers.0.self_attn.q_proj.weight"][0]
    key_width = shapes["model.layers.0.self_attn.k_proj.weight"][0]
    if query_width != num_attention_heads * head_dim or key_width != num_key_value_heads * head_dim:
        raise ValueError(
            f"head counts ({num_attention_heads} query, {num_key_value_heads} key/value) do not fit "
            f"q_proj/k_proj widths {query_width}/{key_width} at hidden size {hidden_size}"
        )

    # transformers >= 5 writes rope_theta inside rope_parameters.
    rope_parameters = checkpoint_config.get("rope_parameters") or {}
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"config.json: rope_parameters must be an object, not {rope_parameters!r}")
    rope_theta = checkpoint_config.get("rope_theta", rope_parameters.get("rope_theta"))
    if rope_theta is not None and (not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool)
                                   or not rope_theta > 0):
        raise ValueError(f"config.json: rope_theta must be a number > 0, not {rope_theta!r}")
    rope_scaling = checkpoint_config.get("rope_scaling")
    if rope_parameters.get("rope_type", "default") != "default":
        rope_scaling = dict(rope_parameters)

    return {
        "model_type": "qwen2",
        "hidden_size": int(hidden_size),
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": int(intermediate_size),
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": int(vocab_size),
        "rms_norm_eps": positive("rms_norm_eps"),
        "rope_theta": float(DEFAULTS["rope_theta"] if rope_theta is None else rope_theta),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": count("max_position_embeddings"),
        # The released file writes lm_head.weight even though config.json says
        # tied (docs/reference-model.md §1.1 / reference README): the tensors decide.
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": field("bos_token_id"),
        "eos_token_id": field("eos_token_id"),
    }


def convert(names, get, config):
    return convert_with_rules(RULES, names, get)
