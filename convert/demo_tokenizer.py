"""The demo checkpoint's tokenizer: a tiny byte-level BPE in Qwen2's slow-tokenizer file layout.

:func:`bpe` trains it (deterministically) on a built-in text with Qwen2's normalisation and
pre-tokenization, so the converter's :func:`mobileo_mlx.convert.checkpoint.build_fast_tokenizer`
and transformers' slow ``Qwen2Tokenizer`` read its files as they read the release's;
:func:`tokenizer_files` gives the files the release ships (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``; no
``tokenizer.json``), with Qwen2's special tokens and Mobile-O's ``[IMG]``, ``[/IMG]``,
``<image>`` right after the BPE vocabulary.
"""

from __future__ import annotations

import json
from functools import lru_cache

from mobileo_mlx.convert.checkpoint import QWEN2_SPLIT_PATTERN

# Qwen2's special tokens, then the ones Mobile-O's training adds, after the BPE vocabulary.
ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "[IMG]", "[/IMG]", "<image>")
BPE_VOCAB_SIZE = 512  # 256 byte symbols + 256 merges

_TRAINING_TEXT = """\
You are a helpful assistant. Please generate image based on the following caption: a small cat
sleeping on a red sofa next to an open window. Please edit the provided image according to the
following description: make the sky orange and add two birds. What is in this picture? The picture
shows a kitchen with a wooden table, three chairs and a bowl of green apples. Describe the image in
detail. There is a dog running across a field of tall grass while the sun goes down behind the
hills.

The weather was cold this morning, so the children wore their warm coats and walked to school
together. On the way they counted the cars, the trees and the houses, and they talked about the
stories their teacher had read to them the day before. In the afternoon it started to rain, and
everyone stayed inside to draw pictures of boats, mountains, flowers and animals.

A photo of a yellow bicycle leaning against a brick wall. A painting of a lighthouse on a rocky
coast at night, with waves breaking against the stones. A close-up of a coffee cup on a white
table, with steam rising into the morning light. An astronaut riding a horse on the moon, in the
style of an old film poster. Two people sitting on a bench in a park, reading books under a large
tree. A bowl of soup, a piece of bread and a glass of water on a blue tablecloth.

Question: How many people are in the image? Answer: There are 4 people in the image. Question:
What color is the car? Answer: The car is red. Question: Where is the cat? Answer: The cat is on
the sofa, next to the window. Question: What time of day is it? Answer: It looks like the evening,
because the light is warm and the shadows are long. It's 12:30, and we'll meet at 5 o'clock; they've
said they'd bring 20 apples, 3 oranges and 1 cake. I'm sure you're right, aren't you?

Images are made of pixels, and every pixel has a red, a green and a blue value. A model that
understands images turns these values into features, and a language model reads the features
together with the words of the question. A model that generates images starts from noise and
removes a little of it at every step, guided by the caption, until a clear picture appears.
"""


@lru_cache(maxsize=1)
def bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab, merges) of a byte-level BPE trained on the built-in text (deterministic)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    return dict(sorted(model["vocab"].items(), key=lambda kv: kv[1])), merges


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_files() -> dict[str, str]:
    """File name -> text of the tokenizer files, as the slow ``Qwen2Tokenizer`` saves them."""
    vocab, merges = bpe()
    ids = token_ids()
    special = {k: v for k, v in _added_token("").items() if k != "special"}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 512,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_map = {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {**special, "content": "<|im_end|>"},
        "pad_token": {**special, "content": "<|endoftext|>"},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "added_tokens.json": json.dumps(ids, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def token_ids() -> dict[str, int]:
    """Ids of the added tokens (right after the BPE vocabulary)."""
    base = len(bpe()[0])
    return {token: base + i for i, token in enumerate(ADDED_TOKENS)}


def tokenizer_size() -> int:
    return len(bpe()[0]) + len(ADDED_TOKENS)
