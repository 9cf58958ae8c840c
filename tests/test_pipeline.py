"""End to end: the runtime against the PyTorch reference pipelines (SPEC §3) with the same
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
from mobileo_mlx.kernels import bf16_matmul
from mobileo_mlx.convert import demo
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


@pytest.mark.skipif(not bf16_matmul.available(), reason="bf16 CPU matmuls unavailable on this machine")
def test_bf16_products_hold_only_while_a_picture_stage_evaluates(model):
    """The bf16 switch is process-wide: it must be on inside a picture stage's evaluation and
    off everywhere else, between the denoising steps (the caller's code) and in the LM's stages."""
    def bf16_on() -> bool:
        before = bf16_matmul.products_done()
        mx.eval(mx.ones((16, 16)) @ mx.ones((16, 16)))
        return bf16_matmul.products_done() > before

    fast = mobileo_mlx.load(str(model.folder), cpu_matmul="bf16")
    before = bf16_matmul.min_product()
    bf16_matmul.min_product(0)
    try:
        with bf16_matmul.bf16_products():
            assert bf16_on()  # the probe sees the switch
        assert not bf16_on()
        for name in ("vision", "dit", "vae"):
            with fast.stage(name) as evaluate:
                assert evaluate(bf16_on) and not bf16_on()
            with model.stage(name) as evaluate:  # cpu_matmul="fp32" (the suite's)
                assert not evaluate(bf16_on)
        for name in ("conditioning", "text"):
            with fast.stage(name) as evaluate:
                assert not evaluate(bf16_on)
        conditioning = fast.caption_conditioning(PROMPT)
        done = bf16_matmul.products_done()
        between = [bf16_on() for step in fast.generate_latents(conditioning, steps=3, seed=0)]
        assert between == [False] * 3 and bf16_matmul.products_done() > done  # the steps ran in bf16
        assert [bf16_on() for _ in fast.chat("Hello", max_tokens=3, stream=True)] == [False] * 3
    finally:
        bf16_matmul.min_product(before)


@pytest.mark.skipif(not bf16_matmul.available(), reason="bf16 CPU matmuls unavailable on this machine")
def test_bf16_cpu_matmuls_serve_the_picture_stages_only(model, reference):
    """cpu_matmul="bf16": the DiT and VAE products take bfloat16 inputs, the language model's
    do not (its greedy tokens stay the reference's), and the picture stays close."""
    fast = mobileo_mlx.load(str(model.folder), cpu_matmul="bf16")
    assert fast.cpu_matmul == "bf16" and model.cpu_matmul == "fp32"  # the suite pins fp32
    before = bf16_matmul.min_product()
    bf16_matmul.min_product(0)  # the demo model's products are all small
    try:
        done = bf16_matmul.products_done()
        question = "What is in this picture?"
        answer = fast.ask(picture(2), question, max_tokens=8)
        vision_products = bf16_matmul.products_done() - done
        assert vision_products > 0  # the vision tower's products
        done = bf16_matmul.products_done()
        assert fast.chat([Message("user", "Hello there")], max_tokens=8) == model.chat(
            [Message("user", "Hello there")], max_tokens=8)
        assert bf16_matmul.products_done() == done  # the language model: float32 throughout
        noise = noise_for(model, seed=20)
        ours = fast.generate(PROMPT, steps=20, guidance=1.5, noise=noise)
        assert bf16_matmul.products_done() > done
    finally:
        bf16_matmul.min_product(before)
    from mobileo_mlx import processing

    expected = reference.generate(processing.GENERATION_TEMPLATE.format(prompt=PROMPT), noise, 20, 1.5)
    delta = np.abs(np.asarray(ours, dtype=np.int16) - expected.astype(np.int16))
    assert 0 < delta.max() <= 16 and delta.mean() < 1.0, (delta.max(), delta.mean())  # reached 4 / 0.39
    assert isinstance(answer, str)


@pytest.mark.skipif(not bf16_matmul.available(), reason="bf16 CPU matmuls unavailable on this machine")
def test_bf16_products_cover_the_whole_vision_graph(model, monkeypatch):
    """The native GELU and depthwise conv evaluate their inputs while the graph is built, so
    the bf16 context must be open while the vision tower is *built*, not only evaluated:
    image_features must equal the tower built and evaluated entirely inside the context."""
    from mobileo_mlx.kernels import depthwise, gelu
    from mobileo_mlx import processing

    monkeypatch.setattr(gelu, "MIN_VALUES", 0)  # the demo tower is small: let the native kernels run
    monkeypatch.setattr(depthwise, "NATIVE_MIN_MACS", 0)
    native_gelus = []
    real_gelu = gelu.gelu_in_place
    monkeypatch.setattr(gelu, "gelu_in_place", lambda x, twin: native_gelus.append(1) or real_gelu(x, twin))
    fast = mobileo_mlx.load(str(model.folder), cpu_matmul="bf16")
    before = bf16_matmul.min_product()
    bf16_matmul.min_product(0)
    try:
        source = picture(3)
        features = fast.image_features(source)
        pixels = mx.array(processing.preprocess_image(source, fast.vision_size))
        with bf16_matmul.bf16_products():
            whole = fast.component("projector")(fast.component("vision")(pixels))
            mx.eval(whole)
    finally:
        bf16_matmul.min_product(before)
    assert native_gelus  # the native path really ran inside
    assert np.array_equal(np.array(features), np.array(whole))
