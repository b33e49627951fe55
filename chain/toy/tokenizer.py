"""Offline CLIP tokenizer of the toy world: byte-level BPE trained on the toy captions.

Every word of the toy vocabulary becomes one token, so the small text encoder does not have to assemble words
from characters. The files are the standard CLIP pair (``vocab.json``, ``merges.txt``), so
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads them like any Stable Diffusion tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chain.toy.dataset import COLOURS, SHAPES, TEXTURES
from qtmio.atomic import write_text_atomic

__all__ = ["MODEL_MAX_LENGTH", "toy_words", "train_toy_tokenizer"]

MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def toy_words() -> list[str]:
    """All words that toy captions use, sorted."""
    words = {"a", "an", "with", "on", "background"} | set(COLOURS) | set(SHAPES)
    for name in TEXTURES:
        words.update(name.split())
    return sorted(words)


def train_toy_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Train the byte-level BPE on the toy words and save ``vocab.json``, ``merges.txt`` and the tokenizer
    config into ``out_dir``. Deterministic: the corpus is the sorted word list, repeated."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = toy_words()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(words)] * 8, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=1, sort_keys=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MODEL_MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": EOS,
                "do_lower_case": True,
            },
            indent=1,
        ),
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=1
        ),
    }
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return out
