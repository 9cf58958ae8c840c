"""Checkpoint builders and an independent tokenizer reference for the converter
and hub tests.

* :func:`write_demo` writes the demo checkpoint (released layout, random values).
* :func:`write_reference_checkpoint` writes a float32 checkpoint whose LM, DiT
  and VAE come from the real reference classes (transformers'
  Qwen2ForCausalLM, diffusers' SanaTransformer2DModel and AutoencoderDC) at
  the demo sizes, under the released names; it returns those models.
* :class:`SlowQwen2Reference` re-implements transformers' slow (pure Python)
  Qwen2Tokenizer algorithm: NFC, split on added tokens, Qwen2's regex,
  byte-to-unicode mapping, rank-ordered BPE merges.
* :func:`convert` runs the converter's command line in-process.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

from mobileo_mlx.convert import demo


def write_demo(folder: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    return demo.write_checkpoint(folder, "demo", seed=seed, dtype=dtype)


def read_tensors(file: Path) -> dict:
    """name -> torch tensor (keeps bf16)."""
    from safetensors.torch import load_file

    return load_file(str(file))


def save_tensors(file: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite ``folder/model.safetensors`` through ``edit(dict) -> dict``."""
    file = folder / "model.safetensors"
    save_tensors(file, edit(dict(read_tensors(file))))


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def write_reference_checkpoint(folder: Path, seed: int = 0):
    """A float32 checkpoint in the released layout whose language model, DiT and
    VAE are real transformers / diffusers modules (random weights, demo sizes).
    Returns ``(lm, dit, vae)`` (torch modules in eval mode)."""
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    write_demo(folder, dtype="float32", seed=seed)
    config = json.loads((folder / "config.json").read_text())
    tensors = dict(read_tensors(folder / "model.safetensors"))
    torch.manual_seed(seed)

    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            tie_word_embeddings=False,
        )
    ).eval()
    dit = SanaTransformer2DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text())).eval()
    vae = AutoencoderDC.from_config(json.loads((folder / "vae" / "config.json").read_text())).eval()
    with torch.no_grad():
        for module in (dit, vae):  # non-trivial tables, norms and biases
            for name, param in module.named_parameters():
                std = param[0].numel() ** -0.5 if param.ndim >= 2 and "scale_shift_table" not in name else 0.1
                param.copy_(torch.randn(param.shape) * std + (1.0 if name.endswith("norm.weight") else 0.0))

    replaced = {}
    for prefix, module in (("", lm), ("model.dit.", dit), ("model.vae.", vae)):
        for name, value in module.state_dict().items():
            replaced[prefix + name] = value.float()
    unknown = sorted(set(replaced) - set(tensors))
    if unknown:  # the demo writes the released names: the reference classes must agree
        raise AssertionError(f"reference tensors the demo checkpoint lacks: {unknown[:5]}")
    for name, value in replaced.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise AssertionError(f"{name}: demo {tuple(tensors[name].shape)}, reference {tuple(value.shape)}")
    tensors.update(replaced)
    save_tensors(folder / "model.safetensors", tensors)
    return lm, dit, vae


def convert(*argv) -> int:
    """``python -m convert.from_torch ARGV -q`` in-process; returns the exit code."""
    from mobileo_mlx.convert.from_torch import main

    return main([str(a) for a in argv] + ["--quiet"])


# ---------------------------------------------------------------------------
# tokenizer reference


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class SlowQwen2Reference:
    """The slow Qwen2Tokenizer's encode, from its files, in plain Python."""

    def __init__(self, folder: Path):
        import regex
        from transformers.models.qwen2 import tokenization_qwen2

        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        self.added = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
        self.pattern = regex.compile(tokenization_qwen2.PRETOKENIZE_REGEX)
        self.symbols = _byte_symbols()

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """(chunk, is_added_token) pieces, longest added token first at each position."""
        pieces, start, i = [], 0, 0
        by_length = sorted(self.added, key=len, reverse=True)
        while i < len(text):
            match = next((t for t in by_length if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            if start < i:
                pieces.append((text[start:i], False))
            pieces.append((match, True))
            i = start = i + len(match)
        if start < len(text):
            pieces.append((text[start:], False))
        return pieces

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk, is_added in self._split_added(unicodedata.normalize("NFC", text)):
            if is_added:
                ids.append(self.added[chunk])
                continue
            for piece in self.pattern.findall(chunk):
                word = "".join(self.symbols[b] for b in piece.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self._bpe(word))
        return ids


TOKENIZER_TEXTS = [
    "Hello world",
    "A photo of a cat sitting on a red sofa, highly detailed.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\nlines\r\n\n\nend",
    "numbers 1234567 3.14159 -42 1e10 2024-11-23",
    "unicode: café naïve Ωmega 你好世界 こんにちは 😀🚀 ñ",
    "decomposed: cafe\u0301 (NFC turns it into café)",
    "contractions: don't I'll WE'RE it's they've",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "[IMG]<image>[/IMG] tokens glued<image><image>",
    "<|endoftext|><|endoftext|> after",
    "",
    " ",
    "\n",
    "symbols !@#$%^&*()_+-={}[]|\\:;\"'<>,.?/~`",
    "mixed 3 spaces   then\u00a0nbsp\u3000ideographic space",
]
