"""The converter (`python -m convert.from_torch`) and loading converted folders
(`mobileo_mlx.weights`): round trips, layouts, input formats, quantization
recipes, the fast tokenizer, diffusers config resolution, bad inputs, and
never leaving a partial output."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tests.fixtures import (
    TOKENIZER_TEXTS,
    SlowQwen2Reference,
    convert,
    copy_checkpoint,
    edit_config,
    edit_tensors,
    read_tensors,
    save_tensors,
    write_demo,
    write_reference_checkpoint,
)
from tests.helpers import relative_error
from mlx.utils import tree_flatten

import mobileo_mlx.convert.from_torch as from_torch
from mobileo_mlx.convert.checkpoint import (
    QWEN2_SPLIT_PATTERN,
    Checkpoint,
    PlannedTensor,
    SafetensorsWriter,
    bf16_bits_to_float32,
    build_fast_tokenizer,
    float32_to_bf16_bits,
    read_safetensors_header,
    resolve_diffusion_configs,
)
from mobileo_mlx import backends, weights
from mobileo_mlx.backends import cpu
from mobileo_mlx.backends.cpu import quantized as cpu_quantized
from mobileo_mlx.errors import ConversionError
from mobileo_mlx.weights import load_component, read_config

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
COMPONENTS = ("vision", "projector", "language", "mcp", "dit", "vae")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "ckpt")


@pytest.fixture(scope="module")
def converted(demo_checkpoint, tmp_path_factory):
    """recipe -> converted demo folder, converted on first use."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}

    def get(recipe: str) -> Path:
        if recipe not in folders:
            out = root / recipe
            assert convert(demo_checkpoint, "--output", out, "--quantize", recipe) == 0
            folders[recipe] = out
        return folders[recipe]

    return get


def digests(folder: Path) -> dict[str, str]:
    return {c: hashlib.sha256((folder / f"{c}.safetensors").read_bytes()).hexdigest() for c in COMPONENTS}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------
# round trips


def test_none_keeps_bf16_bits_and_loads_every_component(demo_checkpoint, converted):
    out = converted("none")
    source = read_tensors(demo_checkpoint / "model.safetensors")
    header = read_safetensors_header(out / "language.safetensors")
    assert {info.dtype for info in header.values()} == {"BF16"}
    stored = mx.load(str(out / "language.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "lm_head.weight"):
        expected = source[name].float().numpy()
        np.testing.assert_array_equal(np.array(stored[name].astype(mx.float32)), expected)

    config = read_config(out)
    assert (out / "tokenizer.json").is_file()
    assert set(config) >= {*COMPONENTS, "scheduler", "quantization", "source", "licence"}
    for component in COMPONENTS:
        params = tree_flatten(load_component(out, component, config=config).parameters())
        assert params and {p.dtype for _, p in params} == {mx.float32}  # CPU compute dtype
    # Unused weights are left out: the VAE encoder and the vision head.
    vae_names = mx.load(str(out / "vae.safetensors"))
    assert not [n for n in vae_names if "encoder" in n]
    assert "head" not in " ".join(mx.load(str(out / "vision.safetensors")))
    assert config["source"]["left_out"]["unused (VAE encoder, vision head, ...)"] > 0
    assert (out / "README.md").read_text().startswith("---")


def test_float32_checkpoint_passes_through_exactly(tmp_path):
    checkpoint = write_demo(tmp_path / "ckpt", dtype="float32")
    out = tmp_path / "out"
    assert convert(checkpoint, "--output", out, "--quantize", "none") == 0
    source = read_tensors(checkpoint / "model.safetensors")
    language = mx.load(str(out / "language.safetensors"))
    assert {info.dtype for info in read_safetensors_header(out / "language.safetensors").values()} == {"F32"}
    for name, value in language.items():
        np.testing.assert_array_equal(np.array(value), source[name].numpy())
    mcp = mx.load(str(out / "mcp.safetensors"))
    assert mcp["temperature"].shape == () and mcp["temperature"].item() == source[
        "model.diffusion_connector.fusion.temperature"
    ].item()


@pytest.fixture(scope="module")
def reference_conversion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    lm, dit, vae = write_reference_checkpoint(folder / "ckpt")
    assert convert(folder / "ckpt", "--output", folder / "out", "--quantize", "none") == 0
    return folder / "out", lm, dit, vae


def test_reference_language_model_round_trip(reference_conversion):
    import torch

    out, lm, _, _ = reference_conversion
    ids = np.array([[3, 17, 250, 511, 42, 7]])
    with torch.no_grad():
        expected = lm(torch.from_numpy(ids)).logits.numpy()
    actual = load_component(out, "language")(mx.array(ids))
    assert relative_error(actual, expected) <= 1e-4


def test_reference_dit_and_vae_round_trip(reference_conversion):
    import torch

    out, _, dit, vae = reference_conversion
    rng = np.random.default_rng(0)
    channels = dit.config.in_channels
    latents = rng.standard_normal((2, 4, 4, channels)).astype(np.float32)
    caption = rng.standard_normal((2, 7, dit.config.caption_channels)).astype(np.float32)
    with torch.no_grad():
        expected = dit(
            hidden_states=torch.from_numpy(latents).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(caption),
            timestep=torch.tensor([999, 136]),
        ).sample.permute(0, 2, 3, 1).numpy()
        image = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    velocity = load_component(out, "dit")(mx.array(latents), mx.array([999, 136]), mx.array(caption))
    assert relative_error(velocity, expected) <= 1e-4
    decoded = load_component(out, "vae")(mx.array(latents))
    assert relative_error(decoded, image) <= 1e-4


# ---------------------------------------------------------------------------
# layouts and input formats


def test_layouts_give_identical_weights(demo_checkpoint, converted, tmp_path):
    reference = digests(converted("mixed"))

    # final_merged_model_23620/ given as its parent (the repo root).
    nested = tmp_path / "nested"
    copy_checkpoint(demo_checkpoint, nested / "final_merged_model_23620")
    # The released repo: weights at the root, with stale base_model.* copies and
    # an unknown tensor; config, tokenizer and diffusers configs in the subfolder.
    released = tmp_path / "released"
    copy_checkpoint(demo_checkpoint, released / "final_merged_model_23620")
    tensors = dict(read_tensors(demo_checkpoint / "model.safetensors"))
    tensors.update({"base_model.model." + k: v.clone() for k, v in list(tensors.items())[:20]})
    tensors["model.some_future_module.weight"] = tensors["model.norm.weight"].clone()
    save_tensors(released / "model.safetensors", tensors)
    (released / "final_merged_model_23620" / "model.safetensors").unlink()

    for number, source in enumerate((nested, released, demo_checkpoint / "model.safetensors")):
        out = tmp_path / f"out{number}"
        assert convert(source, "--output", out) == 0
        assert digests(out) == reference, source
    left_out = json.loads((tmp_path / "out1" / "config.json").read_text())["source"]["left_out"]
    assert left_out["stale base_model.* duplicates"] == 20 and left_out["unknown"] == 1


def test_sharded_safetensors_with_index(demo_checkpoint, converted, tmp_path):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    tensors = read_tensors(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_tensors(checkpoint / shard, {n: tensors[n] for n in shard_names})
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert(checkpoint, "--output", tmp_path / "out") == 0
    assert digests(tmp_path / "out") == digests(converted("mixed"))


def test_pytorch_bin_checkpoint(demo_checkpoint, converted, tmp_path):
    import torch

    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    torch.save(dict(read_tensors(checkpoint / "model.safetensors")), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    assert convert(checkpoint, "--output", tmp_path / "out") == 0
    assert digests(tmp_path / "out") == digests(converted("mixed"))


def test_bin_checkpoint_without_torch_says_what_to_install(demo_checkpoint, tmp_path, monkeypatch, capsys):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert convert(checkpoint, "--output", tmp_path / "out") == 1
    assert "needs PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickle_with_code_is_refused(demo_checkpoint, tmp_path, capsys):
    import torch

    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    (checkpoint / "model.safetensors").unlink()
    torch.save({"weights": Path("not a tensor")}, checkpoint / "pytorch_model.bin")  # needs unpickling code
    assert convert(checkpoint, "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a loadable PyTorch checkpoint" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model_type", ["mobileo_inference", "mobile_o_inference"])
def test_both_model_type_spellings(demo_checkpoint, tmp_path, model_type):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    edit_config(checkpoint, lambda c: c.update(model_type=model_type))
    assert convert(checkpoint, "--output", tmp_path / "out", "--quantize", "none") == 0


# ---------------------------------------------------------------------------
# bad inputs: one line on stderr, exit 1, nothing written


def _drop(*names):
    return lambda tensors: {k: v for k, v in tensors.items() if k not in names}


def _reshape(name, shape):
    import torch

    return lambda tensors: {**tensors, name: torch.zeros(shape, dtype=tensors[name].dtype)}


def _no_prefix(prefix):
    return lambda tensors: {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def _truncate(folder: Path):
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 1000)


def _garbage_header(folder: Path):
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))


BAD_CHECKPOINTS = {
    "empty folder": (lambda f: [p.unlink() for p in f.glob("*.*")], "not a Mobile-O checkpoint: no model.safetensors"),
    "no config.json": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "other model_type": (lambda f: edit_config(f, lambda c: c.update(model_type="llama")), "model_type 'llama'"),
    "no DiT": (lambda f: edit_tensors(f, _no_prefix("model.dit.")), "no tensors for the SANA DiT (model.dit.*)"),
    "missing LM tensor": (
        lambda f: edit_tensors(f, _drop("model.layers.1.mlp.up_proj.weight")),
        "missing tensors for the Qwen2 language model: model.layers.1.mlp.up_proj.weight",
    ),
    "missing DiT tensor": (
        lambda f: edit_tensors(f, _drop("model.dit.transformer_blocks.1.attn1.to_k.weight")),
        "missing tensors for the SANA DiT: model.dit.transformer_blocks.1.attn1.to_k.weight",
    ),
    "shape mismatch": (
        lambda f: edit_tensors(f, _reshape("model.layers.2.mlp.up_proj.weight", (128, 63))),
        "shape mismatch for model.layers.2.mlp.up_proj.weight: the model expects [128, 64] (MLX layout), "
        "the checkpoint gives [128, 63]",
    ),
    "truncated": (_truncate, "is truncated"),
    "corrupt header": (_garbage_header, "is corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_gives_one_clear_line(case, demo_checkpoint, tmp_path, capsys):
    damage, message = BAD_CHECKPOINTS[case]
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    damage(checkpoint)
    out = tmp_path / "out"
    assert convert(checkpoint, "--output", out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert message in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_checkpoint_path(tmp_path, capsys):
    assert convert(tmp_path / "nowhere", "--output", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'nowhere'}"


def test_existing_output_is_refused_then_replaced_with_force(demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder: --force may fill it
    assert convert(demo_checkpoint, "--output", out) == 1
    assert "output exists" in capsys.readouterr().err
    assert convert(demo_checkpoint, "--output", out, "--force") == 0
    first = (out / "config.json").stat().st_ino
    assert convert(demo_checkpoint, "--output", out, "--force", "--quantize", "none") == 0  # an earlier conversion
    assert (out / "config.json").stat().st_ino != first
    assert weights.read_config(out)["quantization"]["recipe"] == "none"
    assert leftovers(tmp_path) == []


def test_output_inside_the_checkpoint_is_refused(demo_checkpoint, tmp_path, capsys):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    assert convert(checkpoint, "--output", checkpoint, "--force") == 1
    assert "must lie outside the checkpoint" in capsys.readouterr().err
    assert (checkpoint / "model.safetensors").is_file()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_nothing(demo_checkpoint, tmp_path, monkeypatch, error):
    written = []
    real_write = from_torch.write_component

    def fail_on_third(checkpoint, plan, path, progress):
        if len(written) == 2:
            raise error("simulated failure")
        real_write(checkpoint, plan, path, progress)
        written.append(plan.name)

    monkeypatch.setattr(from_torch, "write_component", fail_on_third)
    out = tmp_path / "out"
    assert convert(demo_checkpoint, "--output", out) == (130 if error is KeyboardInterrupt else 1)
    assert written == ["vision", "projector"]
    assert not out.exists() and leftovers(tmp_path) == []

    # Under --force, an interrupted run keeps the previous output intact.
    monkeypatch.setattr(from_torch, "write_component", real_write)
    assert convert(demo_checkpoint, "--output", out, "--quantize", "none") == 0
    before = sorted((p.name, p.stat().st_ino) for p in out.iterdir())
    monkeypatch.setattr(from_torch, "write_component", fail_on_third)
    written.clear()
    convert(demo_checkpoint, "--output", out, "--force")
    assert sorted((p.name, p.stat().st_ino) for p in out.iterdir()) == before and leftovers(tmp_path) == []


def test_sigterm_unwinds_like_an_interrupt(demo_checkpoint, tmp_path, monkeypatch):
    import signal

    real_write = from_torch.write_component

    def terminated(checkpoint, plan, path, progress):
        real_write(checkpoint, plan, path, progress)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(from_torch, "write_component", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert convert(demo_checkpoint, "--output", tmp_path / "out") == 130
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_leftovers_of_killed_runs_are_removed(demo_checkpoint, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    (tmp_path / f".out.partial-{dead_pid}").mkdir()
    (tmp_path / f".out.partial-{dead_pid}" / "vision.safetensors").write_bytes(b"half")
    (tmp_path / f".other.partial-{dead_pid}").mkdir()  # another output's: not ours to remove
    assert convert(demo_checkpoint, "--output", tmp_path / "out") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.partial-{dead_pid}", "out"]


def test_command_line_help_and_errors_in_a_subprocess(demo_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "convert.from_torch"]
    shown = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert shown.returncode == 0
    for option in ("--output", "--quantize", "--group-size", "--force", "--diffusion-config", "--upload-repo", "--quiet"):
        assert option in shown.stdout
    text = " ".join(shown.stdout.split())
    assert "(default: mixed)" in text and "(default: 64)" in text and text.count("(default:") >= 7

    bad = subprocess.run(command + [str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

    good = subprocess.run(command + [str(demo_checkpoint), "-o", str(tmp_path / "o")], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert good.returncode == 0, good.stderr
    assert "language" in good.stderr and "tensor" in good.stderr  # per-tensor progress bars on stderr
    assert weights.is_converted_folder(tmp_path / "o")


# ---------------------------------------------------------------------------
# quantization


def _logits(folder: Path) -> np.ndarray:
    model = backends.accelerate(load_component(folder, "language"), "language")
    return np.array(model(mx.array([[3, 17, 250, 511, 42, 7]])))


@pytest.mark.parametrize("recipe", ["8", "4", "mixed"])
def test_quantization_recipes(recipe, converted):
    out = converted(recipe)
    config = weights.read_config(out)
    quantization = config["quantization"]
    assert quantization["recipe"] == recipe and quantization["group_size"] == 64
    layers = quantization["layers"]
    assert "mcp" not in layers  # never quantized
    if recipe == "mixed":
        assert layers["language"]["model.embed_tokens"]["bits"] == 8
        assert layers["language"]["lm_head"]["bits"] == 8
        assert layers["language"]["model.layers.0.mlp.down_proj"]["bits"] == 4
        assert {spec["bits"] for spec in layers["dit"].values()} == {8}
        assert all(path.startswith("transformer_blocks.") for path in layers["dit"])
        assert "vision" not in layers and "projector" not in layers
    else:
        assert {spec["bits"] for c in layers for spec in layers[c].values()} == {int(recipe)}
        assert {"language", "dit", "projector"} <= set(layers)

    for component in COMPONENTS:
        module = backends.accelerate(load_component(out, component), component)
        header = read_safetensors_header(out / f"{component}.safetensors")
        quantized = {p: m for p, m in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module)
                     if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
        assert set(quantized) == set(layers.get(component, {}))
        for path, spec in layers.get(component, {}).items():
            assert header[path + ".weight"].dtype == "U32" and header[path + ".scales"].dtype == "F16"
            assert quantized[path].bits == spec["bits"]
            # On CPU the DiT's and VAE's 8-bit layers are stored K-major once made fast.
            k_major = (mx.default_device() == mx.cpu and component in cpu.K_MAJOR_COMPONENTS
                       and spec["bits"] == 8 and isinstance(quantized[path], nn.QuantizedLinear))
            assert getattr(quantized[path], "k_major", False) == k_major, path

    # Every quantized weight is within one quantization step of the source (MLX
    # keeps the group's largest-magnitude value exact, so the far end may be off
    # by up to a step), plus the float16 rounding of the stored scales and biases.
    source = mx.load(str(converted("none") / "language.safetensors"))
    stored = mx.load(str(out / "language.safetensors"))
    for path, spec in layers["language"].items():
        scales, biases = stored[path + ".scales"].astype(mx.float32), stored[path + ".biases"].astype(mx.float32)
        restored = mx.dequantize(stored[path + ".weight"], scales, biases, group_size=64, bits=spec["bits"])
        error = mx.abs(restored - source[path + ".weight"].astype(mx.float32)).reshape(*scales.shape, 64)
        step = mx.abs(scales)  # MLX may store negative scales
        top = mx.abs(biases) + step * (2 ** spec["bits"] - 1)
        assert mx.all(error <= (step + 2**-10 * top)[..., None]).item(), path
    # On the random demo LM, logits move by ~2% at 8 bits and ~40% at 4 bits.
    error = relative_error(_logits(out), _logits(converted("none")))
    assert 0 < error < {"8": 0.05, "mixed": 0.6, "4": 0.6}[recipe], error


@pytest.mark.parametrize("recipe", ["none", "mixed"])
def test_missing_lm_head_ties_to_the_embedding(recipe, demo_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    edit_tensors(checkpoint, _drop("lm_head.weight"))
    assert convert(checkpoint, "--output", tmp_path / "out", "--quantize", recipe) == 0
    assert weights.read_config(tmp_path / "out")["language"]["tie_word_embeddings"] is True
    assert "lm_head.weight" not in mx.load(str(tmp_path / "out" / "language.safetensors"))
    model = backends.accelerate(load_component(tmp_path / "out", "language"), "language")
    ids = mx.array([[3, 17, 250, 511, 42, 7, 8, 9, 10]])
    hidden = model.model(ids)
    assert relative_error(model(ids), model.model.embed_tokens.as_linear(hidden)) < 1e-6
    embedding = np.array(model.model.embed_tokens(mx.arange(model.config.vocab_size)))
    assert relative_error(model(ids), np.array(hidden) @ embedding.T) < 1e-4


def test_group_size_is_recorded(demo_checkpoint, tmp_path):
    assert convert(demo_checkpoint, "--output", tmp_path / "out", "--quantize", "4", "--group-size", "32") == 0
    layers = weights.read_config(tmp_path / "out")["quantization"]["layers"]
    assert {spec["group_size"] for c in layers for spec in layers[c].values()} == {32}


def test_loading_builds_mlx_quantized_layers_the_cpu_forms_agree(converted):
    """A loaded component holds MLX's quantized layers (what a GPU runs); the CPU backend's forms
    of them compute the same logits."""
    out = converted("mixed")
    plain = load_component(out, "language")
    assert type(plain.model.layers[0].mlp.up_proj) is nn.QuantizedLinear
    assert type(plain.model.embed_tokens) is nn.QuantizedEmbedding
    ids = mx.array([[3, 17, 250, 511, 42, 7, 8, 9, 10, 11]])  # > 8 rows: the dequantize + matmul path on CPU
    expected, few = plain(ids), plain(ids[:, :2])
    fast = backends.accelerate(load_component(out, "language"), "language")
    assert isinstance(fast.model.layers[0].mlp.up_proj, cpu_quantized.QuantizedLinear)
    assert isinstance(fast.model.embed_tokens, cpu_quantized.QuantizedEmbedding)
    assert relative_error(fast(ids), expected) < 1e-5
    assert relative_error(fast(ids[:, :2]), few) < 1e-5  # few rows: the GEMV


def test_loading_checks_names_and_shapes(converted, tmp_path):
    out = copy_checkpoint(converted("none"), tmp_path / "out")
    tensors = mx.load(str(out / "mcp.safetensors"))
    tensors["extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(out / "mcp.safetensors"), tensors)
    with pytest.raises(weights.WeightsError, match="unexpected extra.weight"):
        load_component(out, "mcp")
    del tensors["extra.weight"]
    tensors["compress.weight"] = mx.zeros((3, 3))
    mx.save_safetensors(str(out / "mcp.safetensors"), tensors)
    with pytest.raises(weights.WeightsError, match="compress.weight has shape"):
        load_component(out, "mcp")
    with pytest.raises(weights.WeightsError, match="not a converted"):
        load_component(tmp_path, "mcp")


# ---------------------------------------------------------------------------
# tokenizer


def test_split_pattern_is_qwen2s():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_SPLIT_PATTERN == PRETOKENIZE_REGEX


def test_built_tokenizer_ids_equal_the_slow_tokenizer(demo_checkpoint, converted):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(converted("none") / "tokenizer.json"))
    slow = SlowQwen2Reference(demo_checkpoint)
    transformers_tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    for text in TOKENIZER_TEXTS:
        ids = fast.encode(text).ids
        assert ids == slow.encode(text), text
        assert ids == transformers_tokenizer(text)["input_ids"], text
    assert fast.decode(fast.encode(TOKENIZER_TEXTS[5]).ids) == TOKENIZER_TEXTS[5]
    special = fast.encode("<image>").ids
    assert special == [json.loads((demo_checkpoint / "added_tokens.json").read_text())["<image>"]]


def test_tokenizer_with_a_larger_vocabulary_and_gaps_in_added_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trained.train_from_iterator(TOKENIZER_TEXTS * 20 + [" ".join(TOKENIZER_TEXTS)] * 5, trainer)
    trained.model.save(str(tmp_path))  # vocab.json + merges.txt
    vocab_size = len(json.loads((tmp_path / "vocab.json").read_text()))
    added = {"<|endoftext|>": vocab_size + 3, "<|im_start|>": vocab_size + 4, "<|im_end|>": vocab_size + 5,
             "<image>": vocab_size + 9}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                 "special": True} for t, i in added.items()}}))
    fast = build_fast_tokenizer(tmp_path)
    slow = SlowQwen2Reference(tmp_path)
    assert all(fast.token_to_id(t) == i for t, i in added.items())
    for text in TOKENIZER_TEXTS:
        assert fast.encode(text).ids == slow.encode(text), text


def test_existing_fast_tokenizer_is_copied(demo_checkpoint, converted, tmp_path):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    marker = json.loads((converted("none") / "tokenizer.json").read_text())
    marker["truncation"] = {"direction": "Right", "max_length": 7, "strategy": "LongestFirst", "stride": 0}
    (checkpoint / "tokenizer.json").write_text(json.dumps(marker))
    assert convert(checkpoint, "--output", tmp_path / "out", "--quantize", "none") == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (checkpoint / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------
# diffusers configs


def test_builtin_diffusion_configs_equal_the_released_files():
    from mobileo_mlx.convert.defaults import DIFFUSION_CONFIGS
    from mobileo_mlx.convert.layout import DIFFUSION_CONFIG_FILES

    released = DATA / "Sana_600M_512px_diffusers"
    assert DIFFUSION_CONFIGS.keys() == DIFFUSION_CONFIG_FILES.keys()
    for section, (subfolder, filename) in DIFFUSION_CONFIG_FILES.items():
        assert DIFFUSION_CONFIGS[section] == json.loads((released / subfolder / filename).read_text()), section


def test_without_diffusers_configs_the_builtin_ones_are_used(demo_checkpoint, tmp_path):
    from mobileo_mlx.convert.defaults import DIFFUSION_CONFIGS

    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    for sub in ("transformer", "vae", "scheduler"):
        shutil.rmtree(checkpoint / sub)
    configs, sources = resolve_diffusion_configs(Checkpoint(checkpoint), hub_files=lambda repo, wanted: {})
    assert configs == DIFFUSION_CONFIGS  # the converter's fallback when offline
    assert set(sources.values()) == {"built-in Sana_600M_512px_diffusers values"}


def _diffusers_folder(root: Path, tag: str) -> Path:
    for section, (sub, name) in {"transformer": ("transformer", "config.json"), "vae": ("vae", "config.json"),
                                 "scheduler": ("scheduler", "scheduler_config.json")}.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps({"tag": f"{tag}-{section}"}))
    return root


def test_diffusion_config_resolution_order(demo_checkpoint, tmp_path, monkeypatch):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    override = _diffusers_folder(tmp_path / "override", "override")
    local_repo = _diffusers_folder(tmp_path / "local-repo", "local")
    builtin = {"transformer": {"tag": "builtin-transformer"}, "vae": {"tag": "builtin-vae"},
               "scheduler": {"tag": "builtin-scheduler"}}

    def tags(hub_files=lambda repo, wanted: {}):
        configs, _ = resolve_diffusion_configs(Checkpoint(checkpoint), override if use_override else None,
                                               builtin, hub_files)
        return {section: config.get("tag", "checkpoint") for section, config in configs.items()}

    use_override = True
    assert set(tags().values()) == {"checkpoint"}  # the checkpoint's own diffusers files come first
    (checkpoint / "vae" / "config.json").unlink()
    assert tags()["vae"] == "override-vae" and tags()["transformer"] == "checkpoint"
    use_override = False
    edit_config(checkpoint, lambda c: c.update(diffusion_name_or_path=str(local_repo)))
    assert tags()["vae"] == "local-vae"
    edit_config(checkpoint, lambda c: c.update(diffusion_name_or_path="someone/sana-configs"))
    hub_file = tmp_path / "hub_vae.json"
    hub_file.write_text(json.dumps({"tag": "hub-vae"}))
    asked = []
    assert tags(lambda repo, wanted: asked.append((repo, list(wanted))) or {"vae": hub_file})["vae"] == "hub-vae"
    assert asked == [("someone/sana-configs", ["vae"])]
    assert tags()["vae"] == "builtin-vae"  # nothing on the hub (offline)

    # The real hub lookup: cache first, then a download when the hub is reachable.
    import huggingface_hub

    from mobileo_mlx.convert import download

    calls = []

    def fake_download(repo_id, filename, subfolder=None, local_files_only=False, **kwargs):
        calls.append((repo_id, subfolder, filename, local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(hub_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(download, "hub_reachable", lambda: True)
    found = download.hub_config_files("someone/sana-configs", ["vae"])
    assert found == {"vae": hub_file}
    assert calls == [("someone/sana-configs", "vae", "config.json", True),
                     ("someone/sana-configs", "vae", "config.json", False)]


def test_diffusion_config_option(demo_checkpoint, converted, tmp_path, capsys):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    configs = tmp_path / "configs"
    configs.mkdir()
    for sub in ("transformer", "vae", "scheduler"):
        (checkpoint / sub).rename(configs / sub)
    # Without the configs the built-in (full-size SANA-600M) values do not fit the demo's tensors.
    assert convert(checkpoint, "--output", tmp_path / "bad") == 1
    assert "DiT config" in capsys.readouterr().err
    assert convert(checkpoint, "--output", tmp_path / "out", "--diffusion-config", configs) == 0
    assert digests(tmp_path / "out") == digests(converted("mixed"))
    sources = weights.read_config(tmp_path / "out")["source"]["configs"]
    assert sources["vae"] == f"{configs}/vae/config.json"


# ---------------------------------------------------------------------------
# upload and streaming building blocks


def test_upload_repo_pushes_the_output(demo_checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))
            assert (Path(kwargs["folder_path"]) / "config.json").is_file()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    assert convert(demo_checkpoint, "--output", out, "--upload-repo", "me/mobileo-mlx") == 0
    assert calls[0][:2] == ("create_repo", "me/mobileo-mlx") and calls[0][2]["exist_ok"]
    assert calls[1] == ("upload_folder", "me/mobileo-mlx", str(out))

    def refuse(self, **kwargs):
        raise RuntimeError("401 Unauthorized\nmore details")

    monkeypatch.setattr(FakeApi, "upload_folder", refuse)
    assert convert(demo_checkpoint, "--output", out, "--force", "--upload-repo", "me/mobileo-mlx") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: upload to me/mobileo-mlx failed: 401 Unauthorized"
    assert weights.is_converted_folder(out)  # the conversion itself stays


def test_bfloat16_bits_round_trip_and_round_to_nearest_even():
    import torch

    bits = np.random.default_rng(0).integers(0, 2**16, 100_000, dtype=np.uint16)
    finite = bits[np.isfinite(bf16_bits_to_float32(bits))]
    np.testing.assert_array_equal(float32_to_bf16_bits(bf16_bits_to_float32(finite)), finite)
    values = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 1e3
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(values), expected)


def test_writer_places_tensors_written_in_any_order(tmp_path):
    from safetensors.numpy import load_file

    plan = [PlannedTensor("b", "F32", (5, 3)), PlannedTensor("a", "F16", (2,)), PlannedTensor("c", "U32", (4, 2))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan)
    c = np.arange(8, dtype=np.uint32).reshape(4, 2)
    writer.write_rows("c", 2, c[2:], last=False)
    writer.write("a", np.array([1.5, -2.0]))
    writer.write_rows("c", 0, c[:2], last=True)
    assert writer.missing() == ["b"]
    writer.write("b", np.ones((5, 3)))
    writer.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(loaded["c"], c)
    assert loaded["a"].dtype == np.float16 and loaded["a"].tolist() == [1.5, -2.0]
    np.testing.assert_array_equal(loaded["b"], np.ones((5, 3), np.float32))


def test_writer_streams_chunks_and_can_lay_out_the_widest_dtypes_first(tmp_path, monkeypatch):
    from mobileo_mlx.convert import checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 4)  # chunks of the writer and the caller disagree
    plan = [PlannedTensor("a", "BF16", (3, 3)), PlannedTensor("b", "I64", ()), PlannedTensor("c", "F32", (5,)),
            PlannedTensor("d", "I64", (2,))]
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, plan, metadata={"format": "pt"}, widest_first=True)
    values = np.arange(9, dtype=np.float32) / 4
    writer.write_chunks("a", [values[:5], values[5:7], values[7:]])
    writer.write_chunks("b", [np.array([7])])
    writer.write_chunks("c", [np.full(5, -1.5, np.float32)])
    with pytest.raises(ConversionError, match="more than 2 values"):
        writer.write_chunks("d", [np.arange(3)])
    with pytest.raises(ConversionError, match="1 of 2 values"):
        writer.write_chunks("d", [np.arange(1)])
    assert writer.missing() == ["d"]
    writer.write_chunks("d", [np.array([1]), np.array([-2])])
    writer.close()

    header = read_safetensors_header(path)
    assert list(header) == ["b", "d", "c", "a"]  # 8-byte, 4-byte, 2-byte items: each one aligned
    data_start = header["b"].start
    assert all((info.start - data_start) % {"I64": 8, "F32": 4, "BF16": 2}[info.dtype] == 0 for info in header.values())
    loaded = mx.load(str(path))
    assert loaded["b"].dtype == mx.int64 and loaded["b"].item() == 7 and loaded["d"].tolist() == [1, -2]
    np.testing.assert_array_equal(np.array(loaded["a"].astype(mx.float32)), values.reshape(3, 3))
    np.testing.assert_array_equal(np.array(loaded["c"]), np.full(5, -1.5, np.float32))
