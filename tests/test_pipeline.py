"""End to end: the runtime against the PyTorch reference pipelines (docs/reference-model.md §3) with the same
weights. The checkpoint is the demo writer's, in float32, in the released layout; the
reference reads it as the original code would, the runtime goes through the real converter."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mobileo_mlx
from mobileo_mlx import platform
from mobileo_mlx.convert import from_torch
from mobileo_mlx import backends
from mobileo_mlx.backends.cpu import layers as cpu_layers
from mobileo_mlx.backends.cpu import quantized as cpu_quantized
from mobileo_mlx.convert import demo
from mobileo_mlx.kernels import primitives
from mobileo_mlx.processing import Message
from tests.reference.fastvit_torch import ReferenceConfig
from tests.reference.pipeline_torch import ReferenceMobileO

DIMS = demo.DEMO
PROMPT = "a red bicycle leaning on a wall"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "Mobile-O", "demo", seed=3, dtype="float32")


@pytest.fixture(scope="module")
def model(checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "mlx"
    assert from_torch.main([str(checkpoint), "--output", str(output), "--quantize", "none"]) == 0
    return mobileo_mlx.load(str(output))


@pytest.fixture(scope="module")
def reference(checkpoint):
    vision = ReferenceConfig(widths=list(DIMS.vision_widths), depths=list(DIMS.vision_layers),
                             mlp_ratio=DIMS.vision_mlp_ratio, clip_dim=DIMS.vision_proj_dim)
    return ReferenceMobileO(checkpoint, vision)


def picture(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    rgb = np.stack([np.sin(6 * x), np.cos(4 * y), np.sin(5 * x * y)], -1) * 90 + 128
    return Image.fromarray(np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8))


def noise_for(model, seed: int) -> np.ndarray:
    cells = model.native_size // model.vae_scale
    return np.random.default_rng(seed).standard_normal((1, model.latent_channels, cells, cells)).astype(np.float32)


def assert_same_image(ours: Image.Image, expected: np.ndarray) -> int:
    got = np.asarray(ours, dtype=np.int16)
    assert got.shape == expected.shape
    assert expected.std() > 5, "the reference image is flat: the comparison would prove nothing"
    delta = int(np.abs(got - expected.astype(np.int16)).max())
    assert delta <= 2, f"max |Δ| = {delta}/255"
    return delta


@pytest.mark.parametrize("steps, guidance", [(20, 1.5), (3, 3.0)])
def test_generate_reproduces_the_reference_image(model, reference, steps, guidance):
    noise = noise_for(model, seed=steps)
    ours = model.generate(PROMPT, steps=steps, guidance=guidance, noise=noise)
    from mobileo_mlx import processing

    expected = reference.generate(processing.GENERATION_TEMPLATE.format(prompt=PROMPT), noise, steps, guidance)
    assert ours.size == (model.native_size, model.native_size)
    assert_same_image(ours, expected)


def test_edit_reproduces_the_reference_image(model, reference):
    source = picture(1)
    noise = noise_for(model, seed=11)
    instruction = "make the sky purple"
    ours = model.edit(source, instruction, steps=8, guidance=1.5, noise=noise)
    from mobileo_mlx import processing

    expected = reference.generate(processing.EDIT_TEMPLATE.format(instruction=instruction), noise, 8, 1.5, source)
    assert_same_image(ours, expected)


def test_generation_with_noise_is_deterministic_and_seed_reproducible(model):
    noise = noise_for(model, seed=5)
    first = np.asarray(model.generate(PROMPT, steps=2, noise=noise))
    np.testing.assert_array_equal(first, np.asarray(model.generate(PROMPT, steps=2, noise=noise)))
    a = np.asarray(model.generate(PROMPT, steps=2, seed=7))
    np.testing.assert_array_equal(a, np.asarray(model.generate(PROMPT, steps=2, seed=7)))
    assert not np.array_equal(a, np.asarray(model.generate(PROMPT, steps=2, seed=8)))


def test_ask_greedy_tokens_match_the_reference(model, reference):
    source = picture(2)
    question = "What is in this picture?"
    ours = [r.token for r in model.ask(source, question, max_tokens=12, stream=True)]
    expected = reference.answer_tokens(f"<image>\n{question}", 12, source)
    eos = model.tokenizer.eos_token_id
    ours = ours[: ours.index(eos)] if eos in ours else ours
    assert len(expected) > 0
    assert ours == expected


def test_chat_greedy_tokens_match_the_reference(model, reference):
    ours = [r.token for r in model.chat("Tell me about bicycles.", max_tokens=12, stream=True)]
    expected = reference.answer_tokens("Tell me about bicycles.", 12)
    eos = model.tokenizer.eos_token_id
    ours = ours[: ours.index(eos)] if eos in ours else ours
    assert ours == expected
    text = model.chat("Tell me about bicycles.", max_tokens=12)
    assert text == model.tokenizer.decode(expected).strip()


def test_denoising_generator_yields_every_step(model):
    conditioning = model.conditioning(mobileo_mlx.processing.generation_prompt(PROMPT))
    steps = list(model.generate_latents(conditioning, steps=5, seed=0))
    assert [s.index for s in steps] == list(range(5))
    assert steps[0].timestep == 999
    cells = model.native_size // model.vae_scale
    assert steps[-1].latents.shape == (1, cells, cells, model.latent_channels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.generate(""), "prompt is empty"),
        (lambda m: m.generate("x", steps=0), "steps must be between 1 and 1000"),
        (lambda m: m.generate("x", size=100), "multiple of 32"),
        (lambda m: m.generate("x", noise=np.zeros((1, 3, 2, 2), np.float32)), "noise must have shape"),
        (lambda m: m.ask("/nonexistent.png", "what?"), "image not found"),
        (lambda m: m.ask(np.zeros((4, 4, 3), np.uint8), "  "), "question is empty"),
        (lambda m: m.chat([]), "must end with a user message"),
    ],
)
def test_bad_input_raises_one_clear_error(model, call, message):
    with pytest.raises(mobileo_mlx.processing.InputError, match=message):
        call(model)


def test_long_prompts_are_truncated_with_a_warning(model):
    long_prompt = " ".join(["bicycle"] * 600)
    with pytest.warns(UserWarning, match="512-token limit"):
        conditioning = model.caption_conditioning(long_prompt)
    assert conditioning.prompt_tokens <= 512
    with pytest.warns(UserWarning, match="512-token limit"):  # an edit instruction: its picture slot counts
        prompt = model.caption_prompt(long_prompt, "edit")
    assert len(model.tokenizer.encode_with_image_sentinel(prompt)) <= 512
    assert prompt.startswith("<|im_start|>system") and "bicycle bicycle" in prompt


def test_caption_prompts_are_the_reference_templates(model):
    """caption_prompt: the generation and edit templates of docs/reference-model.md §3.1 around the
    text, the edit one with one picture slot; bad input is one InputError."""
    from mobileo_mlx import processing

    head, tail = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", \
        "<|im_end|>\n<|im_start|>assistant\n"
    assert model.caption_prompt("a kite") == head + "Please generate image based on the following caption: a kite" + tail
    edit = model.caption_prompt("make it blue", "edit")
    assert edit == (head + "<image>\nPlease edit the provided image according to the following description: "
                    "make it blue" + tail)
    assert model.prompt_ids(edit, pictures=1).count(processing.IMAGE_TOKEN_SENTINEL) == 1
    with pytest.raises(mobileo_mlx.processing.InputError, match="instruction is empty"):
        model.caption_prompt("  ", "edit")
    with pytest.raises(mobileo_mlx.processing.InputError, match="unknown caption kind 'ask'"):
        model.caption_prompt("x", "ask")
    with pytest.raises(mobileo_mlx.processing.InputError, match="prompt must be a str, got int"):
        model.generate(5)


def test_generate_and_edit_are_the_documented_pieces(model):
    """generate / edit give the same bytes as the pieces the README shows: caption_conditioning,
    the generate_latents loop, decode."""
    source = picture(5)
    for call, conditioning in [
        (lambda: model.generate(PROMPT, steps=3, seed=4), lambda: model.caption_conditioning(PROMPT)),
        (lambda: model.edit(source, "make it blue", steps=3, seed=4),
         lambda: model.caption_conditioning("make it blue", source)),
    ]:
        whole = np.asarray(call())
        for step in model.generate_latents(conditioning(), steps=3, seed=4):
            pass
        assert np.array_equal(whole, np.asarray(model.decode(step.latents)[0]))
    assert not np.array_equal(np.asarray(model.generate("make it blue", steps=3, seed=4)),
                              np.asarray(model.edit(source, "make it blue", steps=3, seed=4)))


def test_tiled_decoding_is_chosen_by_tile(model):
    """decode(tile=None): the whole picture; tile=T: T x T latent tiles (the whole when one covers it)."""
    latents = model.initial_latents(256, seed=1)  # 8 x 8 latent cells
    whole = np.asarray(model.decode(latents)[0])
    assert np.array_equal(np.asarray(model.decode(latents, tile=8)[0]), whole)
    tiled = np.asarray(model.decode(latents, tile=5)[0])  # 2 x 2 tiles, 2 cells of overlap
    assert tiled.shape == whole.shape == (256, 256, 3)
    assert not np.array_equal(tiled, whole)


# --- the stage context ---------------------------------------------------------------------


def test_the_stages_name_every_component_once():
    from mobileo_mlx import weights
    from mobileo_mlx.pipeline import MobileO

    stages = MobileO.STAGES
    assert {c for stage in stages.values() for c in stage.components} == set(weights.COMPONENTS)
    assert all(len(set(stage.components)) == len(stage.components) for stage in stages.values())


def test_low_memory_frees_each_stage_s_components_when_it_ends(model):
    lean = mobileo_mlx.load(str(model.folder), low_memory=True)
    lean.image_features(picture(6))
    assert lean.loaded == ()
    conditioning = lean.caption_conditioning("make it blue", picture(6))
    assert lean.loaded == ()
    during = []
    for step in lean.generate_latents(conditioning, steps=3, seed=2):
        during.append(lean.loaded)
    assert during == [("dit",)] * 3 and lean.loaded == ()
    steps = lean.generate_latents(conditioning, steps=3, seed=2)
    next(steps)
    steps.close()  # a loop stopped early frees the DiT too
    assert lean.loaded == ()
    lean.decode(step.latents)
    assert lean.loaded == ()
    assert lean.ask(picture(6), "What is it?", max_tokens=3) is not None
    assert lean.loaded == ()
    # Without low_memory the components stay for the next call; the pictures are the same.
    kept = mobileo_mlx.load(str(model.folder))
    assert np.array_equal(np.asarray(kept.generate(PROMPT, steps=2, seed=9)),
                          np.asarray(lean.generate(PROMPT, steps=2, seed=9)))
    assert set(kept.loaded) == {"language", "mcp", "dit", "vae"} and lean.loaded == ()


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@pytest.mark.skipif(platform.backend() != "cpu", reason="the stage buffer cache is for MLX's CPU backend")
def test_the_buffer_cache_limit_is_raised_for_its_stages_and_restored(model):
    small = 1 << 20
    previous = mx.set_cache_limit(small)
    try:
        conditioning = model.caption_conditioning(PROMPT)
        assert _cache_limit() == small
        during = [_cache_limit() for _ in model.generate_latents(conditioning, steps=3, seed=0)]
        assert min(during) > small and _cache_limit() == small
        during = [_cache_limit() for _ in model.chat("Hello", max_tokens=3, stream=True)]
        assert min(during) > small and _cache_limit() == small
        with model.stage("vae"):  # the decode keeps the limit it finds
            assert _cache_limit() == small
        with pytest.raises(RuntimeError, match="stopped"):
            with model.stage("conditioning"):
                assert _cache_limit() > small
                raise RuntimeError("stopped")
        assert _cache_limit() == small
    finally:
        mx.set_cache_limit(previous)


needs_bf16 = pytest.mark.skipif(mx.default_device() != mx.cpu or backends.bf16_unavailable_reason() is not None,
                                reason=f"bf16 CPU matmuls unavailable here: {backends.bf16_unavailable_reason()}")


@needs_bf16
def test_bf16_cpu_matmuls_serve_the_picture_stages_only(model, reference, monkeypatch):
    """cpu_matmul="bf16": the vision tower's, projector's, DiT's and VAE's products take bfloat16
    inputs, the language model's only while it encodes a prompt for a picture, not when it answers
    (its greedy tokens stay the reference's), and the picture stays close."""
    fast = mobileo_mlx.load(str(model.folder), cpu_matmul="bf16")
    assert fast.cpu_matmul == "bf16" and model.cpu_matmul == "fp32"  # the suite pins fp32
    monkeypatch.setattr(backends.tuning, "BF16_MIN_PRODUCT", 0)  # the demo model's products are all small
    products = primitives.extension().bf16_products_done
    done = products()
    answer = fast.ask(picture(2), "What is in this picture?", max_tokens=8)
    assert products() > done  # the vision tower's and the projector's products
    done = products()
    assert fast.chat([Message("user", "Hello there")], max_tokens=8) == model.chat(
        [Message("user", "Hello there")], max_tokens=8)
    assert products() == done  # the language model answering: float32 throughout
    fast.caption_conditioning(PROMPT)
    assert products() > done  # the language model encoding a prompt (the MCP is float32)
    noise = noise_for(model, seed=20)
    ours = fast.generate(PROMPT, steps=20, guidance=1.5, noise=noise)
    assert products() > done
    from mobileo_mlx import processing

    expected = reference.generate(processing.GENERATION_TEMPLATE.format(prompt=PROMPT), noise, 20, 1.5)
    delta = np.abs(np.asarray(ours, dtype=np.int16) - expected.astype(np.int16))
    assert 0 < delta.max() <= 16 and delta.mean() < 1.0, (delta.max(), delta.mean())  # reached 4 / 0.39
    assert isinstance(answer, str)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's forms")
@pytest.mark.parametrize("cpu_matmul", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_components_are_made_fast_once_loaded(model, cpu_matmul):
    """MobileO.component loads the plain model and swaps in the backend's forms once: bf16
    products in the picture components, the language model's only inside an encoding stage."""
    fast = mobileo_mlx.load(str(model.folder), cpu_matmul=cpu_matmul)
    vision, language, dit = fast.component("vision"), fast.component("language"), fast.component("dit")
    assert fast.component("dit") is dit
    assert isinstance(vision.act, cpu_layers.GELU)
    assert isinstance(language.model.layers[0].mlp, cpu_layers.Qwen2MLP)
    assert isinstance(dit.transformer_blocks[0].ff, cpu_layers.GLUMBConv)
    head = dit.proj_out  # never quantized
    assert isinstance(head, cpu_layers.Bf16Linear) == (cpu_matmul == "bf16")
    projection = language.model.layers[0].self_attn.o_proj
    assert not isinstance(projection, cpu_quantized.Bf16QuantizedLinear)
    assert isinstance(projection, (cpu_layers.EncodingLinear, cpu_quantized.EncodingQuantizedLinear)) == (
        cpu_matmul == "bf16")
    products = getattr(projection, "products", cpu_layers.FP32)  # fp32: the plain nn.Linear of a float32 model
    assert not products.bf16
    with fast.stage("conditioning"):
        assert products.bf16 == (cpu_matmul == "bf16")
        with fast.stage("text"):
            assert not products.bf16
    assert not products.bf16
