"""Qwen2 language model: parity with transformers' Qwen2ForCausalLM, generation
through mlx-lm, config inference from the checkpoint, full-size shapes."""

from __future__ import annotations

import json
from pathlib import Path

import mobileo_mlx  # noqa: F401  (routes BLAS before mlx loads)
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from transformers import Qwen2Config, Qwen2ForCausalLM

from mlx.utils import tree_flatten, tree_map

from mobileo_mlx.convert.mapping import load_component, map_name
from mobileo_mlx.models import build
from mobileo_mlx.models.language import LanguageConfig, LanguageModel
from tests.helpers import SEAMS, convert_state_dict, relative_error, seamed

TOLERANCE = 1e-4
VOCAB = 300
HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 160
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
# Token embeddings ~ N(0, 0.3^2): at 1.0 a tied head makes greedy decoding
# repeat one token, which would make the decode comparison weak.
EMBEDDING_SCALE = 0.3

mapping = load_component("language")


def checkpoint_config(model_type: str = "mobileo_inference") -> dict:
    """A Mobile-O config.json for the small model. Its vocab_size is the
    released one on purpose: the converter must read V from the tensors."""
    return {
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rope_theta": ROPE_THETA,
        "rms_norm_eps": RMS_EPS,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "vocab_size": 151649,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "mm_hidden_size": 3072,
    }


def build_reference(tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=RMS_EPS,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).float().eval()
    # Randomise everything, norms and biases included, at scales that keep
    # activations O(1), so no term of the computation is trivially zero or one.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.2 * torch.randn_like(parameter))
            elif name == "model.embed_tokens.weight":
                parameter.copy_(EMBEDDING_SCALE * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[1] ** 0.5)
    assert model.config._attn_implementation == "eager"
    rope = getattr(model.config, "rope_parameters", None) or {"rope_theta": model.config.rope_theta}
    assert rope["rope_theta"] == ROPE_THETA
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def checkpoint_state_dict(reference: Qwen2ForCausalLM) -> dict:
    """The reference's tensors under the released checkpoint's names: a tied
    checkpoint carries no lm_head.weight."""
    state = dict(reference.state_dict())
    if reference.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def convert_reference(reference: Qwen2ForCausalLM, model_type="mobileo_inference", seam="accelerated"):
    config, weights = convert_state_dict(
        "language", checkpoint_state_dict(reference), checkpoint_config(model_type)
    )
    model = build("language", json.loads(json.dumps(config)))  # the dict must be JSON-able
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return config, seamed(model, "language", seam)


@pytest.fixture(scope="module", params=[(tied, seam) for tied in (False, True) for seam in SEAMS],
                ids=lambda param: ("tied-" if param[0] else "untied-") + param[1])
def pair(request):
    tied, seam = request.param
    reference = build_reference(tied=tied)
    model_type = "mobile_o_inference" if tied else "mobileo_inference"
    config, model = convert_reference(reference, model_type, seam)
    return reference, config, model


def random_ids(length: int, seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


def test_converted_config(pair):
    reference, config, model = pair
    assert config["vocab_size"] == VOCAB  # from the tensor, not config.json's 151649
    assert config["hidden_size"] == HIDDEN
    assert config["num_hidden_layers"] == LAYERS
    assert config["intermediate_size"] == INTERMEDIATE
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["rope_theta"] == ROPE_THETA and config["rms_norm_eps"] == RMS_EPS
    assert config["tie_word_embeddings"] == reference.config.tie_word_embeddings
    assert ("lm_head" in model) == (not reference.config.tie_word_embeddings)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_logits_and_hidden_states_match_transformers(pair):
    reference, _, model = pair
    ids = random_ids(12, seed=1, batch=2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), output_hidden_states=True)
    logits = model(mx.array(ids))
    assert logits.shape == (2, 12, VOCAB)
    error = relative_error(logits, expected.logits)
    assert error <= TOLERANCE, f"logits relative error {error:.2e}"

    states = model.hidden_states(model.embed(mx.array(ids)))
    assert len(states) == LAYERS + 1 == len(expected.hidden_states)
    for index, (state, reference_state) in enumerate(zip(states, expected.hidden_states)):
        error = relative_error(state, reference_state)
        assert error <= TOLERANCE, f"hidden state {index}: relative error {error:.2e}"


def test_last_hidden_state_is_final_norm_output(pair):
    """docs/reference-model.md §6 (1): the last entry is post-norm, not the raw layer output."""
    _, _, model = pair
    embeddings = model.embed(mx.array(random_ids(6, seed=2)))
    states = model.hidden_states(embeddings)
    h = states[-2]
    for layer in model.model.layers[-1:]:
        h = layer(h, "causal")
    raw_last = np.array(h)
    assert relative_error(states[-1], model.model.norm(h)) <= 1e-6
    assert relative_error(states[-1], raw_last) > 1e-2


def spliced_embeddings(model: LanguageModel, ids: np.ndarray, start: int, count: int, seed: int):
    """Token embeddings with ``count`` random "image" features from ``start``."""
    embeddings = np.array(model.embed(mx.array(ids)))
    features = np.random.default_rng(seed).standard_normal((ids.shape[0], count, HIDDEN))
    embeddings[:, start : start + count] = features.astype(np.float32)
    return embeddings


def test_input_embeddings_path(pair):
    reference, _, model = pair
    ids = random_ids(14, seed=3)
    by_ids = np.array(model(mx.array(ids)))
    by_embeddings = np.array(model(mx.array(ids), input_embeddings=model.embed(mx.array(ids))))
    assert relative_error(by_embeddings, by_ids) <= 1e-6

    embeddings = spliced_embeddings(model, ids, start=3, count=5, seed=4)
    with torch.no_grad():
        expected = reference(inputs_embeds=torch.from_numpy(embeddings), output_hidden_states=True)
    logits = model(mx.array(ids), input_embeddings=mx.array(embeddings))
    error = relative_error(logits, expected.logits)
    assert error <= TOLERANCE, f"spliced logits relative error {error:.2e}"
    # The splice really changed the result after the image tokens.
    assert relative_error(np.array(logits)[:, 3:], by_ids[:, 3:]) > 1e-2

    states = model.hidden_states(mx.array(embeddings))
    for index, (state, reference_state) in enumerate(zip(states, expected.hidden_states)):
        error = relative_error(state, reference_state)
        assert error <= TOLERANCE, f"spliced hidden state {index}: relative error {error:.2e}"


def test_padding_mask_matches_transformers_attention_mask(pair):
    reference, _, model = pair
    ids = random_ids(10, seed=5, batch=2)
    keep = np.ones_like(ids)
    keep[1, 6:] = 0  # second sequence: 6 real tokens, right-padded
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(keep), output_hidden_states=True
        )
    states = model.hidden_states(model.embed(mx.array(ids)), mask=mx.array(keep))
    for index, (state, reference_state) in enumerate(zip(states, expected.hidden_states)):
        state = np.array(state)
        reference_state = reference_state.numpy()
        error = max(
            relative_error(state[0], reference_state[0]),
            relative_error(state[1, :6], reference_state[1, :6]),
        )
        assert error <= TOLERANCE, f"masked hidden state {index}: relative error {error:.2e}"

    # Left padding leaves fully padded rows; they must not turn into NaN.
    left = np.zeros_like(keep)
    left[:, 4:] = 1
    assert all(np.isfinite(np.array(s)).all() for s in model.hidden_states(
        model.embed(mx.array(ids)), mask=mx.array(left)
    ))


def greedy_mlx(model, prompt: np.ndarray, new_tokens: int, input_embeddings=None) -> list[int]:
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=new_tokens,
        prompt_cache=make_prompt_cache(model),
        prefill_step_size=4,  # chunked prefill through the KV cache
        input_embeddings=None if input_embeddings is None else mx.array(input_embeddings),
    )
    return [int(token) for token, _ in steps]


def greedy_transformers(reference, new_tokens: int, **inputs) -> list[int]:
    with torch.no_grad():
        output = reference.generate(
            **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            use_cache=True, pad_token_id=0,
        )
    return output[0, -new_tokens:].tolist()


def test_greedy_decode_matches_transformers(pair):
    reference, _, model = pair
    prompt = random_ids(11, seed=7)
    expected = greedy_transformers(reference, 16, input_ids=torch.from_numpy(prompt))
    assert greedy_mlx(model, prompt[0], 16) == expected
    assert len(set(expected)) > 1


def test_greedy_decode_with_spliced_embeddings_matches_transformers(pair):
    reference, _, model = pair
    prompt = random_ids(11, seed=6)
    embeddings = spliced_embeddings(model, prompt, start=2, count=4, seed=8)
    expected = greedy_transformers(reference, 16, inputs_embeds=torch.from_numpy(embeddings))
    assert greedy_mlx(model, prompt[0], 16, input_embeddings=embeddings[0]) == expected
    assert len(set(expected)) > 1
    # Without the splice the continuation differs: the embeddings were used.
    assert greedy_mlx(model, prompt[0], 16) != expected


# --- config inference -------------------------------------------------------------------


def small_shapes(tied: bool) -> dict:
    state = checkpoint_state_dict(build_reference(tied=tied))
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def test_config_vocab_from_tensor_and_tie_detection():
    for tied in (False, True):
        config = mapping.config_from_checkpoint(small_shapes(tied), checkpoint_config(), None)
        assert config["vocab_size"] == VOCAB
        assert config["tie_word_embeddings"] is tied
        assert LanguageConfig.from_dict(config).vocab_size == VOCAB


def test_config_defaults_are_qwen2_05b():
    config = mapping.config_from_checkpoint(
        {
            "model.embed_tokens.weight": (151649, 896),
            "model.layers.0.self_attn.q_proj.weight": (896, 896),
            "model.layers.0.self_attn.k_proj.weight": (128, 896),
            "model.layers.0.mlp.gate_proj.weight": (4864, 896),
            "model.layers.1.mlp.gate_proj.weight": (4864, 896),
        },
        {},
    )
    assert config["num_hidden_layers"] == 2
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (14, 2)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (1e6, 1e-6)
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
    assert config["tie_word_embeddings"] is True


def test_config_rejects_inconsistent_or_foreign_checkpoints():
    shapes = small_shapes(tied=False)
    with pytest.raises(ValueError, match="model_type"):
        mapping.config_from_checkpoint(shapes, {**checkpoint_config(), "model_type": "llama"})
    with pytest.raises(ValueError, match="head counts"):
        mapping.config_from_checkpoint(shapes, {**checkpoint_config(), "num_key_value_heads": 4})
    shapes = {k: v for k, v in shapes.items() if not k.startswith("model.layers.2.")}
    with pytest.raises(ValueError, match="contiguous"):
        mapping.config_from_checkpoint(shapes, checkpoint_config())


def test_base_model_duplicates_are_ignored():
    reference = build_reference(tied=False)
    state = checkpoint_state_dict(reference)
    stale = {
        "base_model.model.model.embed_tokens.weight": torch.zeros(7, 3),
        "base_model.model.model.layers.9.mlp.up_proj.weight": torch.zeros(5, 5),
        "base_model.model.lm_head.weight": torch.zeros(7, 3),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8),
    }
    for name in stale:
        assert mapping.KEYS.match(name) and mapping.IGNORE.match(name), name
    clean_config, clean_weights = convert_state_dict("language", state, checkpoint_config())
    config, weights = convert_state_dict("language", {**state, **stale}, checkpoint_config())
    assert config == clean_config
    assert weights.keys() == clean_weights.keys()
    assert all(np.array_equal(weights[k], clean_weights[k]) for k in weights)


def test_released_checkpoint_names_and_config():
    folder = Path(__file__).resolve().parent / "data"  # copies of the released checkpoint's key list and configs
    shapes = {}
    for line in (folder / "keys_full.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        shapes[name] = tuple(json.loads(shape))
    owned = [n for n in shapes if mapping.KEYS.match(n) and not mapping.IGNORE.match(n)]
    assert len(owned) == 1 + 24 * 12 + 1 + 1
    assert all(n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))
               for n in owned)
    released_config = json.loads((folder / "checkpoint_config.json").read_text())
    config = mapping.config_from_checkpoint({n: shapes[n] for n in owned}, released_config)
    assert config["vocab_size"] == 151649
    assert config["num_hidden_layers"] == 24
    # config.json claims tied weights, but the file carries lm_head.weight.
    assert config["tie_word_embeddings"] is False
    # Every released tensor has a rule, and the runtime names and shapes are
    # exactly the model's parameters (names are identical for Qwen2).
    model = LanguageModel(LanguageConfig.from_dict(config))
    parameters = dict(tree_flatten(model.parameters()))
    runtime_names = {map_name(mapping.RULES, n)[0]: n for n in owned}
    assert runtime_names.keys() == parameters.keys()
    assert all(tuple(parameters[r].shape) == shapes[n] for r, n in runtime_names.items())


# --- full size --------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_shapes():
    """Qwen2-0.5B as released (V = 151649, untied), random MLX weights."""
    model = LanguageModel(LanguageConfig())
    # Replace the lazy default init before it runs: numpy draws the 630 M
    # values several times faster than MLX's CPU generator.
    rng = np.random.default_rng(0)
    model.update(
        tree_map(lambda p: mx.array(rng.random(p.shape, dtype=np.float32) * 0.1 - 0.05),
                 model.parameters())
    )
    parameter_count = sum(p.size for _, p in tree_flatten(model.parameters()))
    assert parameter_count == 629_653_120  # docs/reference-model.md §4: 629.65 M at V = 151649

    ids = mx.array([[151643, 872, 198, 151648, 9707, 151645]])
    embeddings = model.embed(ids)
    states = model.hidden_states(embeddings)
    logits = model(ids)
    mx.eval(states, logits)
    assert embeddings.shape == (1, 6, 896)
    assert len(states) == 25
    assert all(state.shape == (1, 6, 896) for state in states)
    assert logits.shape == (1, 6, 151649)
    assert all(np.isfinite(np.array(state)).all() for state in states)
    assert relative_error(model.lm_head(states[-1]), logits) <= 1e-5
