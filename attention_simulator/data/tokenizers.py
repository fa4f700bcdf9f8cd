"""Tokenizers: byte-level (default, nothing to download), a byte-level BPE trained locally with
🤗 tokenizers, or any transformers AutoTokenizer.

Each knows how many UTF-8 bytes every token decodes to (`token_bytes`), so bits per byte is
exact and comparable across tokenizers, and serialises to a string kept in checkpoints (a run
can be sampled from without retraining its tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

from ..errors import ConfigError

EOS = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus an end-of-document token 256."""

    kind = "byte"

    def __init__(self):
        self.vocab_size, self.eos_id = 257, 256
        self.token_bytes = torch.cat([torch.ones(256, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": "byte"})

    @property
    def fingerprint(self) -> str:
        return "byte"


class BPETokenizer:
    """A 🤗 tokenizers byte-level BPE: every token is a byte string, so its byte count is the
    length of its byte-level alphabet spelling."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS)
        self.token_bytes = torch.tensor(
            [0 if t == EOS else len(t) for t in (tokenizer.id_to_token(i) for i in range(self.vocab_size))]
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(f"data.vocab_size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + EOS).")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )  # fmt: skip
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def to_json(self) -> str:
        return json.dumps({"kind": "bpe", "tokenizer": self.tokenizer.to_str()})

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(self.tokenizer.to_str().encode()).hexdigest()[:16]


class AutoTokenizer:
    """A transformers tokenizer by name (needs `transformers`, and the Hub or a local copy)."""

    kind = "auto"

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer as HFAutoTokenizer
        except ImportError as e:
            raise ConfigError(f"data.tokenizer=auto ({name!r}) needs transformers: pip install transformers") from e
        self.name = name
        self.tokenizer = HFAutoTokenizer.from_pretrained(name)
        self.vocab_size = len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.token_bytes = torch.tensor(
            [len(self.tokenizer.decode([i]).encode("utf-8")) for i in range(self.vocab_size)]
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def to_json(self) -> str:
        return json.dumps({"kind": "auto", "name": self.name})

    @property
    def fingerprint(self) -> str:
        return f"auto-{self.name}"


def tokenizer_from_json(text: str):
    """Rebuild a tokenizer saved with `to_json` (e.g. from a checkpoint)."""
    spec = json.loads(text)
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(spec["tokenizer"]))
    return AutoTokenizer(spec["name"])


def build_tokenizer(kind: str, train_texts: Iterable[str], vocab_size: int, name: str | None):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_texts, vocab_size)
    if kind == "auto":
        if not name:
            raise ConfigError("data.tokenizer=auto needs data.tokenizer_name (e.g. gpt2).")
        return AutoTokenizer(name)
    raise ConfigError(f"data.tokenizer={kind!r}: use byte, bpe or auto.")
