"""Files that heal and are never destroyed: the converter's --force, the model cache
(broken conversions converted again, stale temporaries removed, doctor), the safetensors
header checks of checkpoints and converted folders, hand-edited configs, MOBILEO_MLX_CACHE,
an empty --model, and conversions killed at random moments."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import json
import math
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.fixtures import convert, copy_checkpoint, edit_config, write_demo

from mobileo_mlx import demo, hub, platform, weights
from mobileo_mlx.convert.checkpoint import read_safetensors_header
from mobileo_mlx.errors import ConversionError, InputError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("vision", "projector", "language", "mcp", "dit", "vae")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("files-demo") / "ckpt")


@pytest.fixture(scope="module")
def converted(demo_checkpoint, tmp_path_factory) -> Path:
    """A conversion of the demo checkpoint (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("files-converted") / "demo"
    assert convert(demo_checkpoint, "--output", out) == 0
    return out


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit(dict)``, keeping its data bytes."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def tensor_names(header: dict) -> list[str]:
    """Names in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ---------------------------------------------------------------------------
# 4. --force replaces only what the converter wrote


def _user_folder(out: Path, converted: Path) -> None:
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"\xff\xd8 mine")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("keep me")


def _user_folder_with_config(out: Path, converted: Path) -> None:
    _user_folder(out, converted)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "format": "something-else"}))


def _conversion_plus_user_file(out: Path, converted: Path) -> None:
    shutil.copytree(converted, out)
    (out / "my-notes.md").write_text("mine")


def _conversion_with_user_subfolder(out: Path, converted: Path) -> None:
    shutil.copytree(converted, out)
    (out / "outputs").mkdir()
    (out / "outputs" / "cat.png").write_bytes(b"png")


def _conversion(out: Path, converted: Path) -> None:
    shutil.copytree(converted, out)


def _conversion_with_truncated_config(out: Path, converted: Path) -> None:
    shutil.copytree(converted, out)
    config = out / "config.json"
    config.write_bytes(config.read_bytes()[:300])


def _conversion_missing_files(out: Path, converted: Path) -> None:
    shutil.copytree(converted, out)
    (out / "dit.safetensors").unlink()
    (out / "README.md").unlink()


def _empty_folder(out: Path, converted: Path) -> None:
    out.mkdir()


FORCE_CASES = {
    # name: (set-up, replaced?, what the refusal says)
    "user folder": (_user_folder, False, "is neither (no config.json with \"format\": \"mobileo-mlx\")"),
    "user folder with another config.json": (_user_folder_with_config, False, "is neither"),
    "conversion plus a user file": (_conversion_plus_user_file, False, "did not write in"),
    "conversion plus a user subfolder": (_conversion_with_user_subfolder, False, "(outputs)"),
    "earlier conversion": (_conversion, True, None),
    "earlier conversion, config.json truncated": (_conversion_with_truncated_config, True, None),
    "earlier conversion, files missing": (_conversion_missing_files, True, None),
    "empty folder": (_empty_folder, True, None),
}


@pytest.mark.parametrize("case", list(FORCE_CASES))
def test_force_replaces_only_what_the_converter_wrote(case, demo_checkpoint, converted, tmp_path, capsys):
    set_up, replaced, message = FORCE_CASES[case]
    out = tmp_path / "out"
    set_up(out, converted)
    before = contents(out)
    status = convert(demo_checkpoint, "--output", out, "--force", "--quantize", "none")
    err = capsys.readouterr().err
    if replaced:
        assert status == 0, err
        assert weights.read_config(out)["quantization"]["recipe"] == "none"
        weights.check_folder(out)
    else:
        assert status == 1
        assert message in one_line_error(err)
        assert "choose another --output" in err
        assert contents(out) == before  # not one byte of the user's folder changed
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left


def test_force_refuses_a_file_and_the_checkpoint_itself(demo_checkpoint, tmp_path, capsys):
    target = tmp_path / "model"
    target.write_text("a file")
    assert convert(demo_checkpoint, "--output", target, "--force") == 1
    assert "not a folder" in one_line_error(capsys.readouterr().err) and target.read_text() == "a file"
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    before = contents(checkpoint)
    assert convert(checkpoint, "--output", checkpoint, "--force") == 1
    assert "must lie outside the checkpoint" in capsys.readouterr().err and contents(checkpoint) == before


# ---------------------------------------------------------------------------
# 8. the cache heals


@pytest.fixture(scope="module")
def cached_template(demo_checkpoint, tmp_path_factory):
    """(cache folder name, its files): the demo conversion hub.resolve_model makes."""
    cache = tmp_path_factory.mktemp("files-cache-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILEO_MLX_CACHE", str(cache))
        patch.setattr(demo, "demo_checkpoint_path", lambda: demo_checkpoint)
        folder = hub.resolve_model("demo", progress=False)
    return folder.name, folder


@pytest.fixture
def cache(cached_template, demo_checkpoint, monkeypatch, tmp_path) -> Path:
    """A private cache that already holds the demo conversion (copied from the template);
    returns that converted folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(root))
    monkeypatch.setattr(demo, "demo_checkpoint_path", lambda: demo_checkpoint)
    name, template = cached_template
    shutil.copytree(template, root / "converted" / name)
    return root / "converted" / name


def _truncate(component):
    def damage(folder: Path):
        file = folder / f"{component}.safetensors"
        os.truncate(file, file.stat().st_size - 100)

    return damage


def _garbage_header(folder: Path):
    file = folder / "language.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))


def _overlapping_offsets(folder: Path):
    def edit(header):
        first, second = tensor_names(header)[:2]
        span = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        start = header[first]["data_offsets"][0]
        header[second]["data_offsets"] = [start, start + span]  # on top of the first one

    rewrite_header(folder / "mcp.safetensors", edit)


def _gap_before_last(folder: Path):
    def edit(header):
        last = tensor_names(header)[-1]
        header[last]["data_offsets"] = [header[last]["data_offsets"][0] + 4, header[last]["data_offsets"][1] + 4]

    rewrite_header(folder / "projector.safetensors", edit)


def _wrong_dtype(folder: Path):
    def edit(header):
        header[tensor_names(header)[0]]["dtype"] = "F64"  # twice the bytes the offsets hold

    rewrite_header(folder / "vae.safetensors", edit)


def _edit_config(edit):
    def damage(folder: Path):
        path = folder / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))

    return damage


CACHE_DAMAGE = {
    # name: (damage, component whose loading the heal is checked with)
    "truncated dit.safetensors": (_truncate("dit"), "dit"),
    "truncated vae.safetensors": (_truncate("vae"), "vae"),
    "garbage in a header": (_garbage_header, "language"),
    "overlapping tensor offsets": (_overlapping_offsets, "mcp"),
    "a gap between tensors": (_gap_before_last, "projector"),
    "a wrong dtype": (_wrong_dtype, "vae"),
    "missing vision.safetensors": (lambda f: (f / "vision.safetensors").unlink(), "vision"),
    "missing tokenizer.json": (lambda f: (f / "tokenizer.json").unlink(), "language"),
    "truncated tokenizer.json": (lambda f: os.truncate(f / "tokenizer.json", 100), "language"),
    "missing config.json": (lambda f: (f / "config.json").unlink(), "mcp"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{ not json"), "mcp"),
    "config.json language: null": (_edit_config(lambda c: c.update(language=None)), "language"),
    "config.json without a dit section": (_edit_config(lambda c: c.pop("dit")), "dit"),
    "config.json num_attention_heads 0": (
        _edit_config(lambda c: c["language"].update(num_attention_heads=0)), "language"),
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_broken_cached_conversion_is_converted_again(case, cache, capsys):
    damage, component = CACHE_DAMAGE[case]
    damage(cache)
    with pytest.raises(WeightsError):
        weights.check_folder(cache)
    assert hub.resolve_model("demo", progress=False) == cache
    err = capsys.readouterr().err
    assert "the cached conversion of demo is broken" in err and "converting it again" in err
    weights.check_folder(cache)
    assert weights.load_component(cache, component) is not None
    assert hub.resolve_model("demo", progress=False) == cache  # healed: no second conversion
    assert "broken" not in capsys.readouterr().err
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporaries left


def test_healed_cache_loads_and_answers(cache, capsys):
    _truncate("language")(cache)
    model = mobileo_mlx.load("demo")
    assert isinstance(model.chat("Hello", max_tokens=3), str)
    assert "broken" in capsys.readouterr().err


def _run_fix_command(message: str) -> int:
    """Run the `mobileo-mlx convert ...` command an error message names."""
    from mobileo_mlx.convert.from_torch import main

    command = shlex.split(message.split("convert it again: ", 1)[1])
    assert command[:2] == ["mobileo-mlx", "convert"]
    return main(command[2:] + ["--quiet"], prog="mobileo-mlx convert")


@pytest.mark.parametrize("case", ["truncated dit.safetensors", "overlapping tensor offsets",
                                  "config.json language: null", "config.json num_attention_heads 0"])
def test_broken_folder_outside_the_cache_names_the_command_that_fixes_it(case, converted, tmp_path):
    folder = tmp_path / "my model"  # a space: the command must quote it
    shutil.copytree(converted, folder)
    CACHE_DAMAGE[case][0](folder)
    with pytest.raises(WeightsError) as error:
        hub.resolve_model(str(folder), progress=False)
    message = str(error.value)
    assert "\n" not in message and "--force" in message and "--quantize mixed" in message
    assert _run_fix_command(message) == 0
    assert hub.resolve_model(str(folder), progress=False) == folder
    weights.check_folder(folder)


def test_a_folder_of_an_older_format_is_refused_with_the_command_that_converts_it_again(converted, tmp_path):
    """Stored names change with the format version (format 2: SANA's diffusers names): a folder
    written under an older one is never loaded, and the error names the fix."""
    folder = tmp_path / "old model"
    shutil.copytree(converted, folder)
    edit_config(folder, lambda c: c.update(format_version=weights.FORMAT_VERSION - 1))
    for check in (weights.read_config, lambda f: weights.load_component(f, "dit")):
        with pytest.raises(WeightsError, match=f"older mobileo-mlx \\(format {weights.FORMAT_VERSION - 1}"):
            check(folder)
    with pytest.raises(WeightsError) as error:
        hub.resolve_model(str(folder), progress=False)
    assert "\n" not in str(error.value) and "--force" in str(error.value)
    assert _run_fix_command(str(error.value)) == 0
    assert weights.read_config(folder)["format_version"] == weights.FORMAT_VERSION
    assert hub.resolve_model(str(folder), progress=False) == folder


def test_a_cache_entry_of_an_older_format_is_converted_again(demo_checkpoint, tmp_path, monkeypatch):
    """The cache key holds the format version: after an upgrade the demo is converted again into a
    new entry, and the old one is never loaded."""
    from mobileo_mlx.convert import from_torch

    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "demo_checkpoint_path", lambda: demo_checkpoint)
    previous = weights.FORMAT_VERSION - 1
    with pytest.MonkeyPatch.context() as older:
        for module in (weights, hub, from_torch):
            older.setattr(module, "FORMAT_VERSION", previous)
        old = hub.resolve_model("demo", progress=False)
    assert json.loads((old / "config.json").read_text())["format_version"] == previous
    new = hub.resolve_model("demo", progress=False)
    assert new != old and new.parent == old.parent
    assert weights.read_config(new)["format_version"] == weights.FORMAT_VERSION
    with pytest.raises(WeightsError, match="older mobileo-mlx"):
        weights.check_folder(old)


def test_converted_weights_without_a_config_are_not_taken_for_a_checkpoint(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="holds converted weights but no readable config.json"):
        hub.resolve_model(str(folder), progress=False)


def test_damaged_demo_checkpoint_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path))
    path = demo.demo_checkpoint_path()
    weights_file = path / "model.safetensors"
    good = weights_file.read_bytes()
    os.truncate(weights_file, len(good) // 2)
    assert demo.demo_checkpoint_path() == path and weights_file.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["demo-checkpoint"]


# ---------------------------------------------------------------------------
# stale temporaries and doctor


@pytest.fixture
def sleeper():
    """A live process whose id names a temporary that is in use."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def _make_temporary(path: Path, age_s: float = 0.0) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"half")
    if age_s:
        stamp = time.time() - age_s
        for p in (path / "config.json", path / "model.safetensors", path):
            os.utime(p, (stamp, stamp))
    return path


def test_stale_temporaries_are_removed_and_live_ones_kept(cache, sleeper):
    root, converted = cache.parent.parent, cache.parent
    gone = dead_pid()
    stale = [
        _make_temporary(root / f"demo-checkpoint.tmp-{gone}"),  # a killed demo-checkpoint write
        _make_temporary(converted / f".{cache.name}.partial-{gone}"),  # a killed conversion
        _make_temporary(converted / f".{cache.name}.old-{gone}"),  # killed while replacing
        _make_temporary(converted / f".other.partial-{sleeper}", age_s=platform.STALE_AFTER_S + 60),  # pid reused
    ]
    live = [
        _make_temporary(root / f"demo-checkpoint.tmp-{sleeper}"),
        _make_temporary(converted / f".other.partial-{sleeper}-x"),  # not a temporary's name: never touched
        _make_temporary(converted / f".another.partial-{sleeper}"),
    ]
    report = hub.scan_cache()
    assert report.models == [f"converted/{cache.name}"] and report.broken == []
    assert sorted(report.removed) == sorted(p.name if p.parent == root else f"converted/{p.name}" for p in stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)

    # Resolving a model sweeps the converter's too (the demo checkpoint's: the next test).
    again = _make_temporary(converted / f".x.partial-{gone}")
    assert hub.resolve_model("demo", progress=False) == cache
    assert not again.exists() and all(p.exists() for p in live)


def test_killed_demo_checkpoint_write_is_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path))
    leftover = _make_temporary(tmp_path / f"demo-checkpoint.tmp-{dead_pid()}")
    assert demo.demo_checkpoint_path() == tmp_path / "demo-checkpoint" and not leftover.exists()


def doctor_lines(cache_root: Path) -> dict[str, str]:
    from typer.testing import CliRunner

    from mobileo_mlx.cli import app

    result = CliRunner().invoke(app, ["doctor", "--size", "64"], env={"MOBILEO_MLX_CACHE": str(cache_root)})
    assert result.exit_code == 0, result.output
    rows = [line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line]
    return {key.strip(): value.strip() for key, value in rows}


def test_doctor_lists_only_valid_models_and_reports_the_rest(cache):
    root, converted = cache.parent.parent, cache.parent
    shutil.copytree(cache, converted / "broken-one")
    _truncate("dit")(converted / "broken-one")
    _make_temporary(root / f"demo-checkpoint.tmp-{dead_pid()}")
    _make_temporary(converted / f".{cache.name}.partial-{dead_pid()}")
    lines = doctor_lines(root)
    assert lines["cached models"] == f"converted/{cache.name}"
    check = lines["cache check"]
    assert check.startswith("1 broken, converted again on next use: converted/broken-one (")
    assert "dit.safetensors is truncated" in check and "2 stale temporary folder(s) of killed runs removed" in check
    assert sorted(p.name for p in converted.iterdir()) == sorted(["broken-one", cache.name])
    assert [p.name for p in root.iterdir()] == ["converted"]

    lines = doctor_lines(root)
    assert "stale" not in lines["cache check"]  # removed the first time


def test_doctor_with_the_cache_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    lines = doctor_lines(tmp_path / "file")
    assert lines["cached models"] == "none" and "is a file, not a folder" in lines["cache check"]


# ---------------------------------------------------------------------------
# hand-edited configs of converted folders: a clean error naming the key


def _set(section, key, value):
    return lambda c: c[section].__setitem__(key, value)


CONFIG_EDITS = {
    "language null": (lambda c: c.update(language=None), "'language' must be an object, not null"),
    "vision a list": (lambda c: c.update(vision=[1, 2]), "'vision' must be an object"),
    "no vae section": (lambda c: c.pop("vae"), "has no 'vae' section"),
    "no scheduler section": (lambda c: c.pop("scheduler"), "has no 'scheduler' section"),
    "num_attention_heads 0": (_set("language", "num_attention_heads", 0), "language.num_attention_heads"),
    "num_key_value_heads 3": (_set("language", "num_key_value_heads", 3), "num_key_value_heads 3"),
    "hidden_size not a multiple": (_set("language", "hidden_size", 65), "language.hidden_size 65"),
    "negative layers": (_set("dit", "num_layers", -2), "dit.num_layers must be an integer >= 1, not -2"),
    "negative channels": (_set("vae", "block_out_channels", [8, -16, 32, 32, 64, 64]), "vae.block_out_channels[1]"),
    "a size as text": (_set("mcp", "compress_dim", "32"), "mcp.compress_dim must be an integer >= 1, not \"32\""),
    "a size as a float": (_set("projector", "hidden_size", 64.0), "projector.hidden_size"),
    "a bool as a number": (_set("dit", "attention_bias", 1), "dit.attention_bias must be true or false"),
    "a list too short": (_set("vae", "layers_per_block", [2, 2]), "vae.layers_per_block has 2 entries"),
    "a per-stage list too short": (_set("vision", "depths", [1, 1]), "need one entry per stage"),
    "an unsupported option": (_set("dit", "qk_norm", "rms_norm_across_heads"), "qk_norm"),
    "zero eps": (_set("language", "rms_norm_eps", 0), "language.rms_norm_eps must be a number > 0"),
    "scheduler steps 0": (_set("scheduler", "num_train_timesteps", 0), "scheduler.num_train_timesteps"),
    "format_version text": (lambda c: c.update(format_version="one"), "format_version must be an integer"),
    "quantization bits 7": (
        lambda c: next(iter(c["quantization"]["layers"]["language"].values())).update(bits=7), ".bits must be one of"),
    "quantization layers null": (lambda c: c["quantization"].update(layers=[1]), "quantization.layers must be"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_hand_edited_config_gives_a_clean_error_naming_the_key(case, converted, tmp_path):
    edit, fragment = CONFIG_EDITS[case]
    folder = copy_checkpoint(converted, tmp_path / "model")
    edit_config(folder, edit)
    for check in (weights.read_config, weights.check_folder, lambda f: weights.load_component(f, "mcp"),
                  lambda f: hub.resolve_model(str(f), progress=False)):
        with pytest.raises(WeightsError) as error:
            check(folder)
        assert fragment in str(error.value) and "\n" not in str(error.value)


def test_hand_edited_config_through_the_command_line(converted, tmp_path):
    folder = copy_checkpoint(converted, tmp_path / "model")
    edit_config(folder, lambda c: c["language"].update(num_attention_heads=0))
    result = subprocess.run([sys.executable, "-m", "mobileo_mlx", "chat", "hi", "--model", str(folder)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "language.num_attention_heads must be an integer >= 1, not 0" in line and "ZeroDivision" not in line


MUTATIONS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-2, 80), max_size=7),
    st.dictionaries(st.text(max_size=3), st.integers()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_one_key_loads_or_fails_cleanly(data, converted, tmp_path):
    """A config.json with one key set to anything: reading it either passes or raises a
    WeightsError naming that key, and loading the component then works or raises WeightsError."""
    config = json.loads((converted / "config.json").read_text())
    section = data.draw(st.sampled_from(COMPONENTS + ("scheduler",)))
    key = data.draw(st.sampled_from(sorted(config[section])))
    value = data.draw(MUTATIONS)
    config[section][key] = value
    folder = tmp_path / "model"
    if not folder.exists():
        folder.mkdir()
        for file in converted.iterdir():
            os.symlink(file, folder / file.name)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    try:
        weights.read_config(folder)
    except WeightsError as error:
        assert key in str(error), (key, value, str(error))
        return
    if section != "scheduler":
        try:
            weights.load_component(folder, section, materialize=False)
        except WeightsError:
            pass


def test_a_config_whose_sizes_cannot_be_quantized_as_recorded_is_one_weights_error(converted, tmp_path):
    """Found by the property test above: a head size that makes a quantized layer's input
    narrower than its quantization group failed inside MLX's quantize, not as a WeightsError."""
    config = json.loads((converted / "config.json").read_text())
    config["dit"]["cross_attention_head_dim"] = 1
    for file in converted.iterdir():
        if file.name != "config.json":
            os.symlink(file, tmp_path / file.name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"attn2\.to_out\.0 .* cannot be quantized as recorded"):
        weights.load_component(tmp_path, "dit", materialize=False)


# ---------------------------------------------------------------------------
# MOBILEO_MLX_CACHE and --model


def test_cache_that_is_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path / "file"))
    with pytest.raises(InputError, match=r"the cache folder .*file is a file, not a folder: set MOBILEO_MLX_CACHE"):
        hub.resolve_model("demo", progress=False)
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path / "file" / "below"))
    with pytest.raises(InputError, match="cannot create the cache folder .*Not a directory"):
        demo.demo_checkpoint_path()
    assert platform.cache_dir() == tmp_path / "file" / "below"  # showing the place never fails

    env = {**os.environ, "MOBILEO_MLX_CACHE": str(tmp_path / "file")}
    result = subprocess.run([sys.executable, "-m", "mobileo_mlx", "chat", "hi", "--model", "demo"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2 and "Errno" not in result.stderr
    assert "is a file, not a folder" in one_line_error(result.stderr)


@pytest.mark.parametrize("spec", ["", "   ", "\t"])
def test_empty_model_is_refused_not_the_default(spec, monkeypatch):
    monkeypatch.setattr(hub, "download_checkpoint", lambda *a, **k: pytest.fail("took the default model"))
    with pytest.raises(InputError, match="--model is empty"):
        hub.resolve_model(spec)
    with pytest.raises(InputError, match="--model is empty"):
        mobileo_mlx.load(spec)


def test_empty_model_on_the_command_line(tmp_path):
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "mobileo_mlx", "chat", "hi", "--model", ""],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2 and "--model is empty" in one_line_error(result.stderr)
    assert not (tmp_path / "converted").exists()


# ---------------------------------------------------------------------------
# 9. a checkpoint's config: a clean ConversionError naming the key


def _edit_json(relative, **values):
    def edit(folder: Path):
        path = folder / relative
        config = json.loads(path.read_text())
        config.update(values)
        path.write_text(json.dumps(config))

    return edit


BAD_CHECKPOINT_CONFIGS = {
    "num_attention_heads 0": (_edit_json("config.json", num_attention_heads=0),
                              "num_attention_heads must be an integer >= 1, not 0"),
    "num_attention_heads -4": (_edit_json("config.json", num_attention_heads=-4), "num_attention_heads"),
    "num_attention_heads text": (_edit_json("config.json", num_attention_heads="four"), "num_attention_heads"),
    "num_key_value_heads 0": (_edit_json("config.json", num_key_value_heads=0), "num_key_value_heads"),
    "num_attention_heads 3": (_edit_json("config.json", num_attention_heads=3), "does not divide the hidden size"),
    "rms_norm_eps negative": (_edit_json("config.json", rms_norm_eps=-1e-6), "rms_norm_eps"),
    "rope_theta 0": (_edit_json("config.json", rope_theta=0), "rope_theta"),
    "rope_parameters a list": (_edit_json("config.json", rope_parameters=[1]), "rope_parameters"),
    "VAE head size 0": (_edit_json("vae/config.json", attention_head_dim=0), "attention_head_dim"),
    "DiT layers -2": (_edit_json("transformer/config.json", num_layers=-2), "num_layers"),
    "DiT heads 0": (_edit_json("transformer/config.json", num_attention_heads=0), "num_attention_heads"),
    "scheduler timesteps 0": (_edit_json("scheduler/scheduler_config.json", num_train_timesteps=0),
                              "num_train_timesteps"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINT_CONFIGS))
def test_bad_checkpoint_config_is_a_clean_conversion_error(case, demo_checkpoint, tmp_path, capsys):
    damage, fragment = BAD_CHECKPOINT_CONFIGS[case]
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    damage(checkpoint)
    assert convert(checkpoint, "--output", tmp_path / "out") == 1
    line = one_line_error(capsys.readouterr().err)
    assert fragment in line and "unexpected" not in line
    assert not (tmp_path / "out").exists()


def test_bad_shard_index_is_a_conversion_error(demo_checkpoint, tmp_path, capsys):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": ["a"]}}))
    assert convert(checkpoint, "--output", tmp_path / "out") == 1
    assert "is not a valid shard index" in one_line_error(capsys.readouterr().err)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../ckpt/x"}}))
    assert convert(checkpoint, "--output", tmp_path / "out") == 1
    assert "is not a valid shard index" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------
# safetensors headers: what real writers produce is accepted, anything inconsistent is not

# The format's dtypes and their sizes in bytes (written out here, independently of the code).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
CONVERTER_DTYPES = set(ITEMSIZE) - {"F8_E5M2", "F8_E4M3"}


def test_files_of_real_writers_are_accepted(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrays = {"a": np.zeros((3, 5), np.float32), "empty": np.zeros((0, 4), np.float16),
              "b": np.arange(7, dtype=np.int64), "flag": np.array([True, False]), "scalar": np.float64(2.5)}
    save_file({k: np.asarray(v) for k, v in arrays.items()}, str(tmp_path / "np.safetensors"))
    mx.save_safetensors(str(tmp_path / "mlx.safetensors"),
                        {"w": mx.ones((4, 6), mx.bfloat16), "q": mx.zeros((2, 3), mx.uint32), "z": mx.zeros((0,))})
    for file in (tmp_path / "np.safetensors", tmp_path / "mlx.safetensors"):
        entries = weights.safetensors_entries(file)
        with safe_open(str(file), "numpy" if "np" in file.name else "mlx") as opened:
            assert sorted(entries) == sorted(opened.keys())
            for name in opened.keys():
                assert list(entries[name].shape) == list(opened.get_slice(name).get_shape())
        assert sorted(read_safetensors_header(file)) == sorted(entries)


def _expected_tensors(raw: bytes):
    """What a reader must return for the file ``raw``: {name: (dtype, shape, start, end)}, or
    None when the file breaks the safetensors format."""
    if len(raw) < 8:
        return None
    (length,) = struct.unpack("<Q", raw[:8])
    if length > len(raw) - 8 or length > 100 * 2**20:
        return None

    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate")
        return dict(pairs)

    try:
        header = json.loads(raw[8 : 8 + length].decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None

    def count(v):
        return type(v) is int and v >= 0

    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(type(v) is str for v in entry.values())):
                return None
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in ITEMSIZE:
            return None
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(count(d) for d in shape):
            return None
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(count(v) for v in offsets):
            return None
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[entry["dtype"]]:
            return None
        tensors[name] = (entry["dtype"], tuple(shape), 8 + length + offsets[0], 8 + length + offsets[1])
    position = 8 + length
    for _, _, start, end in sorted(tensors.values(), key=lambda t: (t[2], t[3])):
        if start != position:
            return None
        position = end
    return tensors if position == len(raw) else None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors file, laid out correctly, then (usually) corrupted in one way."""
    count = draw(st.integers(0, 4))
    entries = {}
    for index in range(count):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        entries[f"t{index}"] = {"dtype": dtype, "shape": draw(st.lists(st.integers(0, 4), max_size=3))}
    position = 0
    for name in draw(st.permutations(sorted(entries))):  # data order need not be header order
        size = math.prod(entries[name]["shape"]) * ITEMSIZE[entries[name]["dtype"]]
        entries[name]["data_offsets"] = [position, position + size]
        position += size
    header: object = {"__metadata__": {"format": "pt"}, **entries} if draw(st.booleans()) else dict(entries)
    data_size = position
    names = sorted(entries)
    how = draw(st.sampled_from(["none", "offset", "swap offsets", "dtype", "shape", "data size", "entry",
                                "metadata", "header", "header bytes", "header length", "duplicate", "padding"]))
    raw_header = None
    length_change = 0
    if how == "offset" and names:
        name = draw(st.sampled_from(names))
        entries[name]["data_offsets"][draw(st.integers(0, 1))] = draw(st.integers(-3, data_size + 8))
    elif how == "swap offsets" and len(names) >= 2:
        a, b = draw(st.permutations(names))[:2]
        entries[a]["data_offsets"], entries[b]["data_offsets"] = entries[b]["data_offsets"], entries[a]["data_offsets"]
    elif how == "dtype" and names:
        entries[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE)) | JSON)
    elif how == "shape" and names:
        entries[draw(st.sampled_from(names))]["shape"] = draw(st.lists(st.integers(-2, 5), max_size=3) | JSON)
    elif how == "data size":
        data_size += draw(st.integers(-6, 6))
    elif how == "entry" and names:
        entries[draw(st.sampled_from(names))] = draw(JSON)
    elif how == "metadata" and isinstance(header, dict):
        header["__metadata__"] = draw(JSON)
    elif how == "header":
        header = draw(JSON)
    elif how == "header bytes":
        raw_header = draw(st.binary(max_size=40))
    elif how == "header length":
        length_change = draw(st.integers(-10, 10))
    elif how == "duplicate" and names:
        text = json.dumps(header)
        raw_header = (text[:-1] + f', "{names[0]}": ' + json.dumps(entries[names[0]]) + "}").encode()
    elif how == "padding":  # trailing spaces are how writers align the data: allowed
        raw_header = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    if isinstance(header, dict):
        header.update({k: v for k, v in entries.items() if k in header})
    if raw_header is None:
        raw_header = json.dumps(header).encode()
    data = bytes(draw(st.integers(0, 255)) for _ in range(min(max(data_size, 0), 3))) + b"\0" * max(data_size - 3, 0)
    raw = struct.pack("<Q", max(len(raw_header) + length_change, 0)) + raw_header + data
    if data_size < 0:
        raw = raw[:data_size]
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=safetensors_files())
def test_header_reader_accepts_exactly_the_consistent_files(raw, tmp_path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(raw)
    expected = _expected_tensors(raw)
    try:
        entries = weights.safetensors_entries(file)
    except WeightsError:
        entries = None
    if expected is None:
        assert entries is None, "an inconsistent file was accepted"
    else:
        assert entries is not None, "a consistent file was refused"
        assert {n: (e.dtype, e.shape, e.start, e.end) for n, e in entries.items()} == expected
    try:
        tensors = read_safetensors_header(file)
    except ConversionError:
        tensors = None
    usable = expected is not None and all(dtype in CONVERTER_DTYPES for dtype, *_ in expected.values())
    assert (tensors is not None) == usable
    if tensors is not None:
        assert {n: (t.dtype, t.shape, t.start, t.end) for n, t in tensors.items()} == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=safetensors_files(), component=st.sampled_from(COMPONENTS))
def test_folder_check_refuses_every_inconsistent_component_file(raw, component, converted, tmp_path):
    folder = tmp_path / "model"
    if not folder.exists():
        shutil.copytree(converted, folder)
    (folder / f"{component}.safetensors").write_bytes(raw)
    try:
        weights.check_folder(folder)
        accepted = True
    except WeightsError:
        accepted = False
    assert accepted == (_expected_tensors(raw) is not None)
    shutil.copyfile(converted / f"{component}.safetensors", folder / f"{component}.safetensors")


# ---------------------------------------------------------------------------
# kills at random moments: nothing half-written is ever visible


def _kill_at_random_moment(command, env, rng, watch, cwd=ROOT):
    """Start ``command``; SIGKILL it after a random delay, or just after a path matching one
    of ``watch`` (globs under a folder: (folder, pattern)) appears. Returns the exit status."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if rng.random() < 0.5:
            deadline = time.monotonic() + rng.uniform(0.2, 3.5)
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.005)
        else:
            folder, pattern = rng.choice(watch)
            while process.poll() is None and not any(folder.glob(pattern)):
                time.sleep(0.001)
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.4)]))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    finally:
        process.wait()  # reaped: its id is gone, so what it left is stale
    return process.returncode


def _assert_nothing_half_written(folder: Path) -> None:
    """Everything under ``folder`` that is not a temporary is complete; temporaries are stale."""
    for path in folder.iterdir():
        if platform.TEMPORARY_NAME.match(path.name):
            assert platform.is_stale_temporary(path), path
        elif path.name == "converted":
            _assert_nothing_half_written(path)
        elif path.name == "demo-checkpoint":
            assert demo._intact(path) and demo._read_stamp(path) is not None
        elif path.is_dir():
            weights.check_folder(path)


def test_killed_conversions_leave_nothing_half_written(demo_checkpoint, tmp_path):
    rng = random.Random(1303)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    for attempt in range(4):
        command = [sys.executable, "-m", "convert.from_torch", str(demo_checkpoint), "-o", str(out), "-q", "--force"]
        _kill_at_random_moment(command, env, rng, [(tmp_path, ".out.partial-*"),
                                                   (tmp_path, ".out.partial-*/config.json")])
        _assert_nothing_half_written(tmp_path)
    assert convert(demo_checkpoint, "--output", out, "--force") == 0
    weights.check_folder(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_killed_first_runs_of_the_demo_leave_nothing_half_written(tmp_path, monkeypatch):
    rng = random.Random(2024)
    code = "import mobileo_mlx; from mobileo_mlx import hub; hub.resolve_model('demo', progress=False)"
    for attempt in range(4):
        cache = tmp_path / f"cache{attempt}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOBILEO_MLX_CACHE": str(cache)}
        _kill_at_random_moment([sys.executable, "-c", code], env, rng, [
            (cache, "demo-checkpoint.tmp-*"),
            (cache, "converted/.*.partial-*"),
        ])
        if cache.exists():
            _assert_nothing_half_written(cache)
            report = hub.scan_cache(cache)
            assert report.broken == [] and report.problem is None
        monkeypatch.setenv("MOBILEO_MLX_CACHE", str(cache))
        folder = hub.resolve_model("demo", progress=False)  # the next run succeeds
        weights.check_folder(folder)
        assert sorted(p.name for p in cache.iterdir()) == ["converted", "demo-checkpoint"]
        assert [p.name for p in (cache / "converted").iterdir()] == [folder.name]
