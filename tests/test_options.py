"""The bounds of generate's and edit's options: exactly the documented ranges are accepted, and
anything else (out of range, nan/inf, huge integers, strings, booleans) is refused with one
short InputError line, by the options module, by the command line's check and by the Python API
before any model runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mobileo_mlx
from mobileo_mlx import cli, options
from mobileo_mlx.errors import InputError

# Values a caller or typer can hand over: ints of any size, every kind of float, numbers at the
# edges of each range, strings (typer passes text options as str), booleans and None.
EDGES = [-(2**2000), -(2**64), -1, 0, 1, 2, 31, 32, 33, 64, 99, 100, 101, 999, 1000, 1001, 1024, 1056,
         2**63, 2**64 - 2, 2**64 - 1, 2**64, 2**70, 2**2000, 0.5, 1.0, 1.5, 30.0, 30.000001, -0.0, 1e308]
VALUES = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-5, max_value=1100),
    st.integers(min_value=-5, max_value=1100).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EDGES),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
)
SETTINGS = settings(max_examples=300, deadline=None)


def whole(value):
    """``value`` as an int when the README calls it a whole number (ints, and floats such as
    20.0), else None. Written here, not taken from the module under test."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def verdict(check, *args):
    """("ok", value) or ("refused", message); any other exception fails the test."""
    try:
        return "ok", check(*args)
    except InputError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 200, message
        return "refused", message


def expect(result, accepted: bool, value=None):
    if accepted:
        assert result == ("ok", value), result
    else:
        assert result[0] == "refused", result


@SETTINGS
@given(VALUES)
def test_steps(value):
    number = whole(value)
    expect(verdict(options.check_steps, value), number is not None and 1 <= number <= 1000, number)


@SETTINGS
@given(VALUES)
def test_count(value):
    number = whole(value)
    expect(verdict(options.check_count, value), number is not None and 1 <= number <= 100, number)


@SETTINGS
@given(VALUES)
def test_size(value):
    number = whole(value)
    expect(verdict(options.check_size, value),
           number is not None and 32 <= number <= 1024 and number % 32 == 0, number)


@SETTINGS
@given(VALUES)
def test_guidance(value):
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    accepted = real and 0 <= value <= 30  # nan compares false
    expect(verdict(options.check_guidance, value), accepted, float(value) if accepted else None)


@SETTINGS
@given(VALUES, st.integers(min_value=1, max_value=100))
def test_seed(value, count):
    number = whole(value)
    if value is None:
        expect(verdict(options.check_seed, value, count), True, None)
    else:
        accepted = number is not None and number >= 0 and number + count - 1 <= 2**64 - 1
        expect(verdict(options.check_seed, value, count), accepted, number)


@SETTINGS
@given(VALUES)
def test_preview_every(value):
    number = whole(value)
    accepted = value is None or (number is not None and 1 <= number <= 1000)
    expect(verdict(options.check_preview_every, value), accepted, number)


@SETTINGS
@given(st.one_of(VALUES, st.sampled_from(["dpm", "euler", "DPM", "heun", " dpm", ""])))
def test_scheduler(value):
    expect(verdict(options.check_scheduler, value), value in ("dpm", "euler"), value)


@pytest.mark.parametrize("seed, count", [(2**64 - 1, 1), (2**64 - 5, 5), (0, 100)])
def test_the_last_seeds_are_valid(seed, count):
    assert options.check_seed(seed, count) == seed


# --- the command line's check (before the model loads) -----------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


OUTPUTS = {"a.png": True, "b.jpg": True, "c.tif": True, "no_extension": True, "sub/": True, "": True,
           "d.txt": False, "e.docx": False}


@settings(max_examples=200, deadline=None)
@given(count=VALUES, seed=VALUES, steps=VALUES, guidance=VALUES, size=VALUES, scheduler=VALUES,
       preview_every=VALUES, output=st.sampled_from(sorted(OUTPUTS)))
def test_the_command_line_check_accepts_exactly_the_documented_ranges(
        folder, count, seed, steps, guidance, size, scheduler, preview_every, output):
    """``cli._image_job`` (what generate and edit call before loading the model): InputError
    and nothing else, unless every option is valid. None stands for the options' defaults."""
    scheduler = "dpm" if scheduler is None else scheduler
    steps, count, guidance = (20 if steps is None else steps, 1 if count is None else count,
                              1.5 if guidance is None else guidance)
    result = verdict(cli._image_job, str(folder / output) if output else str(folder) + "/", "mobileo.png",
                     count, seed, steps, guidance, size, scheduler, preview_every)
    checks = [
        verdict(options.check_count, count),
        verdict(options.check_steps, steps),
        verdict(options.check_guidance, guidance),
        verdict(options.check_scheduler, scheduler),
        verdict(options.check_preview_every, preview_every),
        ("ok", None) if size is None else verdict(options.check_size, size),
    ]
    if checks[0][0] == "ok":
        checks.append(verdict(options.check_seed, seed, checks[0][1]))
    valid = all(kind == "ok" for kind, _ in checks) and OUTPUTS[output]
    assert result[0] == ("ok" if valid else "refused"), (result, checks)
    if valid:
        job = result[1]
        assert job.steps == whole(steps) and job.seed == (None if seed is None else whole(seed))
        assert len(job.outputs.targets) == whole(count)


# --- the Python API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILEO_MLX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return mobileo_mlx.load("demo")


BAD_API_OPTIONS = [
    ({"seed": -1}, "seed must be between 0 and 2\\*\\*64 - 1"),
    ({"seed": 2**64}, "seed must be between"),
    ({"seed": 2**70}, "seed must be between"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"steps": 0}, "steps must be between 1 and 1000"),
    ({"steps": 100000}, "steps must be between 1 and 1000"),
    ({"steps": "20"}, "steps must be a whole number"),
    ({"size": 100000}, "size must be a multiple of 32"),
    ({"size": 33}, "size must be a multiple of 32"),
    ({"size": 0}, "size must be a multiple of 32"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": float("inf")}, "guidance must be a finite number"),
    ({"guidance": -1}, "guidance must be in \\[0, 30\\]"),
    ({"scheduler": "heun"}, "unknown sampler"),
]


@pytest.mark.parametrize("kwargs, message", BAD_API_OPTIONS)
def test_the_api_refuses_bad_options_before_any_model_runs(model, monkeypatch, kwargs, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model ran before the options were checked")

    monkeypatch.setattr(model, "conditioning", no_model)
    monkeypatch.setattr(model, "component", no_model)
    with pytest.raises(InputError, match=message):
        model.generate("a kite", **kwargs)
    with pytest.raises(InputError, match=message):
        model.edit(np.zeros((8, 8, 3), np.uint8), "make it red", **kwargs)
    # The denoising generator refuses them when called, not at its first step.
    conditioning = object()
    with pytest.raises(InputError, match=message):
        model.generate_latents(conditioning, **kwargs)


def test_the_api_refuses_bad_initial_latents(model):
    with pytest.raises(InputError, match="seed must be between"):
        model.initial_latents(model.native_size, seed=-1)
    with pytest.raises(InputError, match="size must be a multiple of 32"):
        model.initial_latents(100000, seed=0)
    cells = model.native_size // model.vae_scale
    noise = np.full((1, model.latent_channels, cells, cells), np.nan, np.float32)
    with pytest.raises(InputError, match="noise must be finite"):
        model.initial_latents(model.native_size, noise=noise)


def test_the_largest_seed_draws_a_picture(model):
    """Every seed up to 2**64 - 1 is a valid MLX key: the last one gives a picture, and a
    different one from its neighbour's."""
    last = np.asarray(model.generate("a kite", steps=1, seed=2**64 - 1))
    assert last.shape == (model.native_size, model.native_size, 3)
    assert not np.array_equal(last, np.asarray(model.generate("a kite", steps=1, seed=2**64 - 2)))
