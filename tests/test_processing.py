"""Prompt templates and image preprocessing against the reference's definitions (docs/reference-model.md §3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobileo_mlx import processing
from tests.helpers import png_header_only



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


# --- every picture form to RGB ------------------------------------------------------


def reference_rgb(image: Image.Image) -> np.ndarray:
    """transformers' convert_to_rgb (the reference's CLIPImageProcessor applies it)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True)


def random_rgba(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[0, :, 3] = 0  # fully transparent pixels (their colour must not show)
    pixels[1, :, 3] = 255
    return Image.fromarray(pixels)


def _palette(transparency: bool) -> Image.Image:
    image = random_rgba(3).convert("RGB").quantize(16)
    if transparency:
        image.info["transparency"] = int(np.asarray(image)[0, 0])
    return image


# Modes Pillow converts (with alpha composited on white): the result must be transformers'.
PILLOW_MODES = {
    "1": lambda: random_rgba(1).convert("1"),
    "L": lambda: random_rgba(1).convert("L"),
    "P": lambda: _palette(False),
    "P+transparency": lambda: _palette(True),
    "LA": lambda: random_rgba(2).convert("LA"),
    "PA": lambda: random_rgba(2).convert("RGB").quantize(16).convert("PA"),
    "RGBA": lambda: random_rgba(4),
    "RGBa": lambda: random_rgba(5).convert("RGBa"),
    "CMYK": lambda: random_rgba(6).convert("CMYK"),
    "YCbCr": lambda: random_rgba(7).convert("RGB").convert("YCbCr"),
    "LAB": lambda: random_rgba(8).convert("RGB").convert("LAB"),
    "HSV": lambda: random_rgba(9).convert("RGB").convert("HSV"),
    "RGB+transparency": lambda: _with_info(random_rgba(10).convert("RGB"), transparency=(0, 0, 0)),
}


def _with_info(image: Image.Image, **info) -> Image.Image:
    image.info.update(info)
    return image


@pytest.mark.parametrize("mode", sorted(PILLOW_MODES))
def test_pillow_modes_become_rgb_as_the_reference_does(mode):
    image = PILLOW_MODES[mode]()
    ours = processing.load_image(image)
    assert ours.mode == "RGB" and ours.size == image.size
    # convert_to_rgb looks for an "A" band only, so it would drop premultiplied alpha ("a"):
    # RGBa is held to its straight-alpha twin, put on white like every other alpha.
    expected = reference_rgb(image.convert("RGBA") if mode == "RGBa" else image)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_alpha_is_composited_on_white():
    pixels = np.zeros((2, 2, 4), np.uint8)  # black, fully transparent...
    pixels[1, 1] = (0, 0, 0, 255)  # ...but one opaque black pixel
    pixels[0, 1] = (255, 0, 0, 128)  # and a half-transparent red one
    ours = np.asarray(processing.load_image(Image.fromarray(pixels)))
    assert ours[0, 0].tolist() == [255, 255, 255]
    assert ours[1, 1].tolist() == [0, 0, 0]
    assert ours[0, 1].tolist() == [255, 127, 127]  # 255 * (1 - 128/255), rounded


def test_hsv_and_lab_follow_independent_colour_maths():
    import colorsys

    from PIL import ImageCms

    hsv = Image.merge("HSV", random_rgba(11).convert("RGB").split())
    expected = np.array([[colorsys.hsv_to_rgb(*(p / 255.0)) for p in row] for row in np.asarray(hsv, float)]) * 255
    assert np.abs(np.asarray(processing.load_image(hsv), float) - expected).max() <= 0.5
    lab = random_rgba(12).convert("RGB").convert("LAB")
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    expected = np.asarray(ImageCms.applyTransform(lab, transform))
    np.testing.assert_array_equal(np.asarray(processing.load_image(lab)), expected)


def test_premultiplied_la_is_unpremultiplied_then_put_on_white():
    luma = np.array([[100, 50, 0, 0]], np.uint8)  # premultiplied by alpha
    alpha = np.array([[255, 128, 0, 200]], np.uint8)
    image = Image.merge("La", [Image.fromarray(luma), Image.fromarray(alpha)])
    ours = np.asarray(processing.load_image(image))[0, :, 0].astype(float)
    # Over white, a premultiplied value composites as luma + (255 - alpha).
    np.testing.assert_allclose(ours, luma[0] + (255.0 - alpha[0]), atol=1)


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535], [128, 129, 1000, 60000]], np.uint16)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_pictures_are_scaled_not_clipped(mode):
    if mode == "I":
        image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    else:
        image = Image.new(mode, (4, 2))
        image.putdata([int(v) for v in SIXTEEN_BIT.ravel()])
    ours = np.asarray(processing.load_image(image))
    expected = np.round(SIXTEEN_BIT / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(ours[..., 0], expected)
    assert (ours == ours[..., :1]).all()


def test_mode_i_beyond_sixteen_bits_is_clipped():
    image = Image.fromarray(np.array([[-5, 70000]], np.int32))
    assert np.asarray(processing.load_image(image))[0, :, 0].tolist() == [0, 255]


def test_a_sixteen_bit_png_keeps_its_brightness(tmp_path):
    """The testers' picture: a 16-bit gray PNG of mean 127.8 (8-bit scale) reached the model
    almost white (mean 254.5)."""
    rng = np.random.default_rng(0)
    values = np.clip(rng.normal(127.8 * 257, 40 * 257, (64, 80)), 0, 65535).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    source_mean = values.mean() / 257
    assert abs(source_mean - 127.8) < 0.5
    pixels = processing.preprocess_image(path, 64)[0] * 255
    # The pad to square adds black bars: compare the picture's own rows.
    rows = pixels[8:56]
    assert abs(rows.mean() - source_mean) < 1.0, rows.mean()


def test_float_pictures_take_values_in_zero_one():
    values = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
    ours = np.asarray(processing.load_image(Image.fromarray(values, "F")))
    assert ours[0, :, 0].tolist() == [0, 128, 255, 51]
    with pytest.raises(processing.InputError, match=r"values in \[0, 1\]"):
        processing.load_image(Image.fromarray(values * 255, "F"))


@pytest.mark.parametrize(
    "array, as_image",
    [
        (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, lambda a: Image.fromarray(a, "L")),
        (np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20, lambda a: Image.fromarray(a[..., 0], "L")),
        (np.asarray(random_rgba(13)), lambda a: Image.fromarray(a, "RGBA")),
        (np.asarray(random_rgba(14))[..., :3] / 255.0, lambda a: Image.fromarray(np.round(a * 255).astype(np.uint8))),
        (np.asarray(random_rgba(15)) / 255.0, lambda a: Image.fromarray(np.round(a * 255).astype(np.uint8), "RGBA")),
        (SIXTEEN_BIT, lambda a: Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L")),
    ],
    ids=["gray", "gray-1", "rgba", "float-rgb", "float-rgba", "uint16"],
)
def test_array_forms_match_their_pillow_pictures(array, as_image):
    expected = reference_rgb(as_image(array))
    np.testing.assert_array_equal(np.asarray(processing.load_image(array)), expected)


@pytest.mark.parametrize("side", [13000, 8193])
def test_huge_pictures_are_refused_from_the_header(tmp_path, monkeypatch, side):
    """The testers' 493 KB PNG that decodes to 13000x13000 (2.1 GB): refused before decoding,
    with our message and no Pillow warning."""
    import warnings

    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))

    def no_decoding(self):
        raise AssertionError("the picture was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(processing.InputError, match=f"image too large: .* is {side}x{side} pixels"):
            processing.load_image(path)
    assert not caught, [str(w.message) for w in caught]


def test_the_largest_accepted_picture_is_64_megapixels():
    assert processing.MAX_IMAGE_PIXELS == 8192 * 8192
    wide = np.broadcast_to(np.zeros(1, np.uint8), (8192, 8193, 3))  # a view: nothing allocated
    with pytest.raises(processing.InputError, match="8193x8192 pixels"):
        processing.load_image(wide)
    with pytest.raises(processing.InputError, match="image too large"):
        processing.load_image(Image.new("L", (8193, 8192)))


def test_data_urls_decode_to_the_same_picture(tmp_path):
    import base64

    image = photo_like(30, 20, seed=1)
    path = tmp_path / "p.png"
    image.save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    np.testing.assert_array_equal(np.asarray(processing.load_image(url)), np.asarray(image))
    wrapped = url[:40] + "\n" + url[40:]  # base64 wrapped over lines
    np.testing.assert_array_equal(np.asarray(processing.load_image(wrapped)), np.asarray(image))
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(13000, 13000)).decode()
    with pytest.raises(processing.InputError, match="image too large"):
        processing.load_image(bomb)


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/plain;base64,aGVsbG8=", "not a picture"),
        ("data:image/png;base64,@@@@", "base64 payload is invalid"),
        ("data:image/png;base64,aGVsbG8=", "not an image"),
        ("https://example.com/cat.png", "not fetched from the network"),
        ("HTTP://example.com/cat.png", "not fetched from the network"),
    ],
)
def test_bad_urls_are_refused(url, message):
    with pytest.raises(processing.InputError, match=message):
        processing.load_image(url)


def test_a_url_fetcher_can_be_plugged_in(tmp_path):
    image = photo_like(16, 16, seed=2)
    path = tmp_path / "p.png"
    image.save(path)
    asked = []

    def fetch(url):
        asked.append(url)
        return path.read_bytes()

    loaded = processing.load_image("https://example.com/p.png", fetch_url=fetch)
    assert asked == ["https://example.com/p.png"]
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_damaged_files_are_one_input_error(tmp_path):
    path = tmp_path / "cut.png"
    image = photo_like(64, 64, seed=3)
    image.save(path)
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with pytest.raises(processing.InputError, match="cannot read image"):
        processing.load_image(path)
