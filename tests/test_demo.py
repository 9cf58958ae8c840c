"""The demo checkpoint (the converter's fixture, convert/demo.py) against the released layout, and its
copy in the cache (mobileo_mlx/demo.py)."""

import dataclasses
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx import demo as cached_demo
from mobileo_mlx.convert import checkpoint, demo, demo_tokenizer

REFERENCE = Path(__file__).resolve().parent / "data"  # copies of the released checkpoint's key list and configs
TOKENIZER_FILES = {
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
}


def _reference(name: str) -> Path:
    path = REFERENCE / name
    assert path.exists(), f"{path} is missing"
    return path


def _released_keys() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in _reference("keys_full.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(json.loads(shape)), dtype))
    return rows


def _listed(dims) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (t.name, t.shape, "int64" if t.dtype == "int64" else "bfloat16")
        for t in demo.checkpoint_tensors(dims)
    ]


# Block indices (layer i of a stack) become N; structural indices (which stage, which
# sub-module of a Sequential) stay, so the patterns still pin the architecture.
_BLOCK_INDEX = [
    (re.compile(r"(model\.layers)\.\d+\."), r"\1.N."),
    (re.compile(r"(transformer_blocks)\.\d+\."), r"\1.N."),
    (re.compile(r"(network\.\d+)\.\d+\."), r"\1.N."),
    (re.compile(r"((?:up|down)_blocks\.\d+)\.\d+\."), r"\1.N."),
]


def _patterns(rows) -> dict[str, set[int]]:
    """name pattern -> the tensor ranks seen under it."""
    out: dict[str, set[int]] = {}
    for name, shape, _ in rows:
        for pattern, replacement in _BLOCK_INDEX:
            name = pattern.sub(replacement, name)
        out.setdefault(name, set()).add(len(shape))
    return out


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return demo.write_checkpoint(tmp_path_factory.mktemp("demo"))


# (1) the full-size list is the released checkpoint, line by line ---------------------------------


def test_full_tensor_list_equals_released_checkpoint():
    assert _listed("full") == _released_keys()


# (2) the demo keeps every structure --------------------------------------------------------------


def test_demo_key_patterns_equal_released_patterns():
    released, shrunk = _patterns(_released_keys()), _patterns(_listed("demo"))
    assert sorted(set(released) - set(shrunk)) == []
    assert sorted(set(shrunk) - set(released)) == []
    assert shrunk == released  # same ranks too


def test_demo_geometry():
    d = demo.resolve_dims("demo")
    assert d.vision_tower == "mobileclip_l_256"
    assert (d.image_size // demo.VISION_DOWNSAMPLING) ** 2 == 16  # image tokens
    assert d.native_image_size == 128 and d.latent_size == 4
    assert d.vae_block_types == ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    assert [w // 32 for w in d.vision_widths[3:]] == [2, 4]  # attention heads of 32
    assert d.num_kv_heads < d.num_heads and d.mcp_layers == 4 and d.mcp_refiners == 2
    assert d.vocab_size == demo_tokenizer.tokenizer_size() == len(demo_tokenizer.bpe()[0]) + 6


def test_inconsistent_dims_are_rejected():
    with pytest.raises(ValueError, match="widths must divide"):
        dataclasses.replace(demo.DEMO, vision_widths=(16, 32, 64, 96, 128))
    with pytest.raises(ValueError, match="repeat/group"):
        dataclasses.replace(demo.DEMO, vae_widths=(8, 16, 32, 32, 64, 192))
    with pytest.raises(ValueError, match="cross-attention"):
        dataclasses.replace(demo.DEMO, dit_cross_heads=3)


# (3) the file: BF16 + I64, safetensors layout, loadable, sensible values -------------------------


def test_file_layout_and_dtypes(demo_folder):
    path = demo_folder / "model.safetensors"
    n, header = _header(path)
    assert (8 + n) % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    listed = {t.name: t for t in demo.checkpoint_tensors("demo")}
    assert set(header) == set(listed)
    for name, entry in header.items():
        assert entry["dtype"] == ("I64" if name.endswith("num_batches_tracked") else "BF16"), name
        assert tuple(entry["shape"]) == listed[name].shape
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
    assert spans[-1][1] == path.stat().st_size - 8 - n
    assert path.stat().st_size < 6 * 2**20


def test_file_loads_with_safetensors_and_mlx(demo_folder):
    import torch
    from safetensors import safe_open

    path = str(demo_folder / "model.safetensors")
    loaded = mx.load(path)
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        assert embed.dtype == torch.bfloat16
        count = f.get_tensor(next(k for k in names if k.endswith("num_batches_tracked")))
        assert count.dtype == torch.int64 and count.shape == ()
    assert names == set(loaded)
    np.testing.assert_array_equal(
        np.array(loaded["model.embed_tokens.weight"].astype(mx.float32)), embed.float().numpy()
    )
    for name, value in loaded.items():
        assert bool(mx.all(mx.isfinite(value.astype(mx.float32)))), name

    fusion = demo.MCP_PREFIX
    temperature = loaded[f"{fusion}temperature"]
    assert temperature.ndim == 0 and temperature.item() == 2.0
    np.testing.assert_allclose(
        np.array(loaded[f"{fusion}layer_weights"].astype(mx.float32)),
        np.linspace(0.8, 1.2, 4),
        rtol=2**-8,
    )
    assert mx.array_equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])
    variances = [v for k, v in loaded.items() if k.endswith("running_var")]
    assert variances and all(bool(mx.all(v > 0)) for v in variances)


def test_bfloat16_rounding_matches_mlx():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    x[:4] = [1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0]  # ties round to even
    expected = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(checkpoint.float32_to_bf16_bits(x), expected)


def test_file_is_laid_out_as_safetensors_writes_it(demo_folder, tmp_path):
    """Byte for byte what ``safetensors.torch.save_file`` makes of the same tensors: the demo
    stands in for a file the release's own tooling wrote."""
    from safetensors.torch import load_file, save_file

    path = demo_folder / "model.safetensors"
    save_file(load_file(str(path)), str(tmp_path / "resaved.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "resaved.safetensors").read_bytes() == path.read_bytes()


def test_float32_output(tmp_path):
    demo.write_checkpoint(tmp_path, "demo", dtype="float32")
    _, header = _header(tmp_path / "model.safetensors")
    header.pop("__metadata__")
    assert {e["dtype"] for e in header.values()} == {"F32", "I64"}
    temperature = mx.load(str(tmp_path / "model.safetensors"))[demo.MCP_PREFIX + "temperature"]
    assert temperature.dtype == mx.float32


# (4) tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_files_in_released_layout(demo_folder):
    assert TOKENIZER_FILES <= {p.name for p in demo_folder.iterdir()}
    assert not (demo_folder / "tokenizer.json").exists()
    assert (demo_folder / "merges.txt").read_text().startswith("#version: 0.2\n")
    config = json.loads((demo_folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["model_max_length"] == 512


def test_tokenizer_loads_and_ids_match_config(demo_folder):
    from transformers import AutoTokenizer

    # use_fast=False as the reference loader; transformers 5 builds the Qwen2 BPE from
    # vocab.json + merges.txt either way.
    tokenizer = AutoTokenizer.from_pretrained(demo_folder, use_fast=False)
    config = json.loads((demo_folder / "config.json").read_text())
    bpe_size = len(json.loads((demo_folder / "vocab.json").read_text()))
    ids = tokenizer.convert_tokens_to_ids(list(demo_tokenizer.ADDED_TOKENS))
    assert ids == list(range(bpe_size, bpe_size + 6))
    assert len(tokenizer) == config["vocab_size"] == bpe_size + 6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    assert tokenizer.pad_token_id == config["pad_token_id"] == ids[0]
    assert config["bos_token_id"] == ids[0]

    text = "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n"
    encoded = tokenizer(text)["input_ids"]
    assert encoded[0] == ids[1] and ids[5] in encoded and encoded[-2] == ids[2]
    assert tokenizer.decode(encoded) == text
    words = tokenizer("the picture shows a cat", add_special_tokens=False)["input_ids"]
    assert len(words) < len("the picture shows a cat") / 2  # the merges are used


# (5) deterministic -------------------------------------------------------------------------------


def test_same_seed_same_bytes(demo_folder, tmp_path):
    again = demo.write_checkpoint(tmp_path / "again", "demo", seed=0)
    for path in sorted(p for p in demo_folder.rglob("*") if p.is_file()):
        relative = path.relative_to(demo_folder)
        assert (again / relative).read_bytes() == path.read_bytes(), relative
    other = demo.write_checkpoint(tmp_path / "other", "demo", seed=1)
    assert _header(other / "model.safetensors") == _header(again / "model.safetensors")
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_values_do_not_depend_on_the_chunk_size(demo_folder, tmp_path, monkeypatch):
    # The full checkpoint streams big tensors: generated in chunks, written in chunks of another size.
    monkeypatch.setattr(demo, "_CHUNK", 1000)
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 777)
    chunked = demo.write_checkpoint(tmp_path, "demo", seed=0)
    expected = (demo_folder / "model.safetensors").read_bytes()
    assert (chunked / "model.safetensors").read_bytes() == expected


# (6) configs -------------------------------------------------------------------------------------


def test_config_fields_equal_released(demo_folder):
    released = json.loads(_reference("checkpoint_config.json").read_text())
    written = json.loads((demo_folder / "config.json").read_text())
    assert list(written) == list(released)
    full = demo.checkpoint_config(demo.FULL, demo_tokenizer.token_ids())
    differ = {k for k in released if full[k] != released[k]}
    assert differ == {"bos_token_id", "eos_token_id", "pad_token_id"}  # the tiny tokenizer's ids


def test_diffusers_configs(demo_folder):
    base = _reference("Sana_600M_512px_diffusers")
    for sub, make in [
        ("transformer/config.json", demo.transformer_config),
        ("vae/config.json", demo.vae_config),
    ]:
        released = json.loads((base / sub).read_text())
        assert make(demo.FULL) == released, sub
        assert set(json.loads((demo_folder / sub).read_text())) == set(released), sub
    scheduler = "scheduler/scheduler_config.json"
    written = json.loads((demo_folder / scheduler).read_text())
    assert written == json.loads((base / scheduler).read_text())


def test_reference_models_load_the_demo_and_stay_finite(demo_folder):
    """The written configs describe the written tensors (transformers' Qwen2 and diffusers'
    SANA / DC-AE, built from the demo's config files, load them strictly), and the random
    values give finite outputs of a sensible size."""
    import torch
    import diffusers
    import transformers
    from safetensors.torch import load_file

    weights = {k: v.float() for k, v in load_file(demo_folder / "model.safetensors").items()}

    def component(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

    def config(name: str) -> dict:
        return json.loads((demo_folder / name).read_text())

    language_keys = re.compile(r"model\.(layers|embed_tokens|norm)\.|lm_head\.")
    language = {k: v for k, v in weights.items() if language_keys.match(k)}
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config("config.json")))
    qwen.load_state_dict(language, strict=True)
    dit = diffusers.SanaTransformer2DModel.from_config(config("transformer/config.json"))
    dit.load_state_dict(component(demo.DIT_PREFIX), strict=True)
    vae = diffusers.AutoencoderDC.from_config(config("vae/config.json"))
    vae.load_state_dict(component(demo.VAE_PREFIX), strict=True)

    d = demo.resolve_dims("demo")
    torch.manual_seed(0)
    with torch.no_grad():
        logits = qwen.eval()(torch.arange(12)[None]).logits
        latent = torch.randn(2, d.latent_channels, d.latent_size, d.latent_size)
        caption = torch.randn(2, 7, d.caption_channels)
        velocity = dit.eval()(latent, caption, torch.tensor([999, 136])).sample
        image = vae.eval().decode(latent).sample
    assert image.shape == (2, 3, d.native_image_size, d.native_image_size)
    for out in (logits, velocity, image):
        assert bool(torch.isfinite(out).all()) and 0.1 < out.std().item() < 10


# the cached demo checkpoint ----------------------------------------------------------------------


def test_demo_checkpoint_path_is_cached_and_versioned(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path))
    path = cached_demo.demo_checkpoint_path()
    assert path == tmp_path / "demo-checkpoint"
    weights = path / "model.safetensors"
    assert weights.exists() and (path / "config.json").exists()
    first = weights.stat().st_mtime_ns
    (path / "marker").write_text("kept")  # a cached folder is reused as is
    assert cached_demo.demo_checkpoint_path() == path and (path / "marker").exists()
    monkeypatch.setattr(demo, "WRITER_VERSION", demo.WRITER_VERSION + 1)
    assert cached_demo.demo_checkpoint_path() == path  # a new writer version rewrites it
    assert not (path / "marker").exists() and weights.stat().st_mtime_ns >= first
    assert json.loads((path / cached_demo.DEMO_STAMP).read_text())["writer_version"] == demo.WRITER_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["demo-checkpoint"]  # no staging left behind


def test_writer_needs_no_torch(tmp_path):
    code = (
        "import sys; from mobileo_mlx.convert import demo; demo.write_checkpoint(sys.argv[1]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=root)
    assert (tmp_path / "model.safetensors").exists()
