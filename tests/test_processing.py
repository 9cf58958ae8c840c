"""Prompt templates and image preprocessing against the reference's definitions (SPEC §3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobileo_mlx import processing



def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field with noise: exercises bicubic overshoot and rounding like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(9 * x * y)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), "RGB")


def reference_expand2square(image: Image.Image) -> Image.Image:
    # LLaVA's pad: black canvas (= image mean 0 * 255), the picture centred.
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
    """transformers' CLIPImageProcessor (PIL backend) as the reference configures it."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0, 0, 0], image_std=[1, 1, 1],
    )
    return processor(reference_expand2square(image), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("width, height", [(477, 448), (300, 512), (512, 512)])
@pytest.mark.parametrize("size", [64, 256])
def test_preprocessing_matches_clip_image_processor(tmp_path, width, height, size):
    image = photo_like(width, height, seed=width + height)
    image.save(tmp_path / "photo.png")
    ours = processing.preprocess_image(tmp_path / "photo.png", size)
    assert ours.shape == (1, size, size, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], reference_pixels(image, size))


def test_tall_image_is_centred_on_black():
    tall = np.full((40, 10, 3), 255, np.uint8)
    pixels = processing.preprocess_image(tall, 40)[0]
    assert pixels[:, :15].max() == 0 and pixels[:, 25:].max() == 0
    assert pixels[:, 15:25].min() == 1.0


def test_image_inputs_agree(tmp_path):
    array = (np.arange(24 * 18 * 3) % 251).astype(np.uint8).reshape(24, 18, 3)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    from_array = processing.preprocess_image(array, 32)
    np.testing.assert_array_equal(from_array, processing.preprocess_image(path, 32))
    np.testing.assert_array_equal(from_array, processing.preprocess_image(Image.fromarray(array), 32))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("missing.png", "image not found"),
        ("not_image.txt", "not an image"),
        (np.zeros((4, 4, 2), np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((4, 4, 3), np.int64), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((2, 4, 4, 3), np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.full((4, 4, 3), 2.0, np.float32), r"values in \[0, 1\].*got \[2, 2\]"),
        (np.full((4, 4), np.nan, np.float32), "finite values"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (42, "unsupported image input"),
    ],
)
def test_bad_images_raise_input_error(tmp_path, bad, message):
    (tmp_path / "not_image.txt").write_text("hello")
    if isinstance(bad, str):
        bad = tmp_path / bad
    with pytest.raises(processing.InputError, match=message):
        processing.load_image(bad)


def test_templates_are_the_reference_texts():
    assert processing.generation_prompt("a cat") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPlease generate image based on the following caption: a cat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processing.understanding_prompt("What is this?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processing.edit_prompt("make it red") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nPlease edit the provided image according to the following description: "
        "make it red<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_chat_template():
    messages = [processing.Message("user", "hi"), processing.Message("assistant", "hello"),
                processing.Message("user", "how are you?")]
    assert processing.chat_prompt(messages, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_to_pil_rounds_and_clamps():
    image = processing.to_pil(np.array([[[-0.5, 0.5, 1.5]]], np.float32))
    assert np.asarray(image).tolist() == [[[0, 128, 255]]]
