"""Resolving --model (mobileo_mlx.hub): demo, converted folders, original
checkpoints converted once into the cache, and hub ids with huggingface_hub
mocked (download patterns for both layouts, offline errors)."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import json
import os
import shutil
from pathlib import Path

import pytest
from tests.fixtures import convert, copy_checkpoint, write_demo

import mobileo_mlx.convert.from_torch as from_torch
from mobileo_mlx import hub, weights
from mobileo_mlx.errors import HubError
from mobileo_mlx.convert import download

REPO_ID = "Amshaker/Mobile-O-0.5B"
SUB = "final_merged_model_23620/"
SMALL_FILES = ["config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "generation_config.json"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEO_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("hub-demo") / "ckpt")


@pytest.fixture
def conversions(monkeypatch):
    """Records every conversion the hub starts."""
    calls = []
    real = from_torch.convert_checkpoint

    def counting(source, output, **kwargs):
        calls.append((Path(source), Path(output), kwargs["quantize"]))
        return real(source, output, **{**kwargs, "progress": False})

    monkeypatch.setattr(from_torch, "convert_checkpoint", counting)
    return calls


def test_original_checkpoint_is_converted_once_per_recipe(demo_checkpoint, conversions, tmp_path):
    first = hub.resolve_model(str(demo_checkpoint), progress=False)
    assert weights.is_converted_folder(first)
    assert first.parent == tmp_path / "cache" / "converted"
    assert hub.resolve_model(demo_checkpoint, progress=False) == first  # reused
    assert len(conversions) == 1 and conversions[0][2] == "mixed"

    other = hub.resolve_model(str(demo_checkpoint), quantize="none", progress=False)
    assert other != first and weights.read_config(other)["quantization"]["recipe"] == "none"
    assert len(conversions) == 2


def test_changed_checkpoint_is_converted_again(demo_checkpoint, conversions, tmp_path):
    checkpoint = copy_checkpoint(demo_checkpoint, tmp_path / "ckpt")
    first = hub.resolve_model(checkpoint, progress=False)
    weights_file = checkpoint / "model.safetensors"
    stat = weights_file.stat()
    os.utime(weights_file, (stat.st_atime, stat.st_mtime + 10))
    second = hub.resolve_model(checkpoint, progress=False)
    assert second != first and len(conversions) == 2


def test_converted_folder_is_used_as_is(demo_checkpoint, conversions, tmp_path):
    out = tmp_path / "converted"
    assert convert(demo_checkpoint, "--output", out, "--quantize", "none") == 0
    conversions.clear()
    assert hub.resolve_model(str(out)) == out
    assert conversions == []


def test_demo_is_converted_once_into_the_cache(demo_checkpoint, conversions, monkeypatch, tmp_path):
    from mobileo_mlx import demo

    monkeypatch.setattr(demo, "demo_checkpoint_path", lambda: demo_checkpoint)
    first = hub.resolve_model("demo", progress=False)
    assert first.name.startswith("demo-mixed-") and weights.is_converted_folder(first)
    assert hub.resolve_model("demo", progress=False) == first
    assert len(conversions) == 1


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(HubError, match="model not found: 'no-such-thing'"):
        hub.resolve_model("no-such-thing")


# ---------------------------------------------------------------------------
# the hub, mocked


def test_download_patterns_pick_one_layout_for_the_weights():
    root_and_sub = ["model.safetensors", SUB + "model.safetensors", "README.md", SUB + "config.json"]
    patterns = download.download_patterns(root_and_sub)
    assert "model.safetensors" in patterns and SUB + "model.safetensors" not in patterns  # root wins
    assert {"config.json", SUB + "config.json", "vocab.json", SUB + "merges.txt"} <= set(patterns)
    assert "README.md" not in patterns

    sub_only = [SUB + "model-00001-of-00002.safetensors", SUB + "model-00002-of-00002.safetensors",
                SUB + "model.safetensors.index.json", SUB + "mm_projector.bin"]
    patterns = download.download_patterns(sub_only)
    assert set(sub_only[:3]) <= set(patterns) and SUB + "mm_projector.bin" not in patterns

    bin_only = ["pytorch_model.bin", "training_args.bin"]
    assert "pytorch_model.bin" in download.download_patterns(bin_only)
    assert "training_args.bin" not in download.download_patterns(bin_only)
    with pytest.raises(HubError, match="no Mobile-O weights"):
        download.download_patterns(["README.md", "mm_projector.bin"])


class FakeHub:
    """HfApi.list_repo_files + snapshot_download over a local "repo" folder,
    recording what was asked (released layout: weights at the root, the rest
    in the subfolder)."""

    def __init__(self, repo: Path, snapshots: Path):
        self.repo, self.snapshots = repo, snapshots
        self.requests = []

    def files(self):
        return sorted(str(p.relative_to(self.repo)) for p in self.repo.rglob("*") if p.is_file())

    def install(self, monkeypatch):
        import fnmatch

        import huggingface_hub

        fake = self

        class Api:
            def list_repo_files(self, repo_id, revision=None, **kwargs):
                return fake.files()

        def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
            fake.requests.append({"repo_id": repo_id, "patterns": list(allow_patterns or []),
                                  "local_files_only": local_files_only})
            if local_files_only and not fake.snapshots.exists():
                raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
            target = fake.snapshots / "snapshots" / "abc123"
            for name in fake.files():
                wanted = any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns)
                if wanted and not (target / name).exists():  # like the hub cache: fetched once
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(fake.repo / name, target / name)
            return str(target)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.fixture
def released_repo(demo_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    copy_checkpoint(demo_checkpoint, repo / SUB)
    shutil.copyfile(repo / SUB / "model.safetensors", repo / "model.safetensors")  # the root copy is used
    (repo / SUB / "mm_projector.bin").write_bytes(b"unneeded")
    (repo / "README.md").write_text("card")
    return repo


def test_hub_id_downloads_needed_files_and_converts_once(released_repo, conversions, monkeypatch, tmp_path):
    fake = FakeHub(released_repo, tmp_path / "hf-cache")
    fake.install(monkeypatch)
    monkeypatch.setattr(download, "hub_reachable", lambda: True)
    first = hub.resolve_model(REPO_ID, progress=False)
    assert weights.is_converted_folder(first) and first.name.startswith("Amshaker-Mobile-O-0.5B-mixed-")
    assert weights.read_config(first)["source"]["checkpoint"] == REPO_ID
    patterns = fake.requests[0]["patterns"]
    assert "model.safetensors" in patterns and SUB + "model.safetensors" not in patterns
    snapshot = tmp_path / "hf-cache" / "snapshots" / "abc123"
    assert not (snapshot / SUB / "mm_projector.bin").exists() and not (snapshot / "README.md").exists()
    assert (snapshot / SUB / "config.json").is_file()

    assert hub.resolve_model(REPO_ID, progress=False) == first
    assert len(conversions) == 1


def test_offline_uses_the_local_cache_or_names_the_files(released_repo, monkeypatch, tmp_path):
    fake = FakeHub(released_repo, tmp_path / "hf-cache")
    fake.install(monkeypatch)
    monkeypatch.setattr(download, "hub_reachable", lambda: False)
    with pytest.raises(HubError) as error:
        hub.resolve_model(REPO_ID, progress=False)
    message = str(error.value)
    assert "offline" in message and "model.safetensors" in message and "config.json" in message
    assert "https://huggingface.co/Amshaker/Mobile-O-0.5B" in message and "\n" not in message
    assert fake.requests[-1]["local_files_only"]

    # Once downloaded, the snapshot in the local cache is enough.
    monkeypatch.setattr(download, "hub_reachable", lambda: True)
    download.download_checkpoint(REPO_ID, progress=False)
    monkeypatch.setattr(download, "hub_reachable", lambda: False)
    assert weights.is_converted_folder(hub.resolve_model(REPO_ID, progress=False))


def test_failed_download_says_how_to_resume(released_repo, monkeypatch, tmp_path):
    import huggingface_hub

    FakeHub(released_repo, tmp_path / "hf-cache").install(monkeypatch)
    monkeypatch.setattr(download, "hub_reachable", lambda: True)

    def broken(*args, **kwargs):
        raise OSError("Connection reset by peer\ndetails")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(HubError, match="Connection reset by peer.*run again to resume"):
        download.download_checkpoint(REPO_ID)


def test_converter_accepts_a_hub_id(released_repo, monkeypatch, tmp_path, capsys):
    FakeHub(released_repo, tmp_path / "hf-cache").install(monkeypatch)
    monkeypatch.setattr(download, "hub_reachable", lambda: True)
    out = tmp_path / "out"
    assert convert(REPO_ID, "--output", out) == 0
    assert weights.read_config(out)["source"]["checkpoint"] == REPO_ID

    # The output check comes before any download.
    monkeypatch.setattr(hub, "download_checkpoint", lambda *a, **k: pytest.fail("downloaded"))
    assert convert(REPO_ID, "--output", out) == 1
    assert "output exists" in capsys.readouterr().err


def test_hub_reachable_honours_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.hub_reachable() is False


def test_cache_key_separates_sources_and_recipes(tmp_path):
    a = hub.cache_folder("x", "source-a", "mixed", 64)
    assert a == hub.cache_folder("x", "source-a", "mixed", 64)
    assert len({a, hub.cache_folder("x", "source-b", "mixed", 64), hub.cache_folder("x", "source-a", "4", 64),
                hub.cache_folder("x", "source-a", "mixed", 32)}) == 4
    assert json.dumps(str(a))  # a plain path under the cache
