"""Tokenizers: byte-level (default, nothing to download), a byte-level BPE trained locally with
🤗 tokenizers, or any transformers AutoTokenizer.

Each knows how many UTF-8 bytes every token decodes to (`token_bytes`), so bits per byte is
exact and comparable across tokenizers, encodes a batch of documents into arrays of
`token_dtype(vocab_size)` (`encode_batch`, what corpus-scale tokenisation calls), and
serialises to a string kept in checkpoints (a run can be sampled from without retraining its
tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import regex
import torch

from ..errors import ConfigError
from .sources import built_by_one, cache_root

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# The byte-level pre-tokenizer's split into words (GPT-2's pattern, as 🤗 tokenizers' ByteLevel
# applies it); `regex` for the Unicode classes \p{L} and \p{N}, which `re` lacks.
WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def token_dtype(vocab_size: int) -> type:
    """The narrowest unsigned integer type holding every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def byte_level_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE spells it with (GPT-2's table: printable
    Latin-1 bytes stand for themselves, the others for U+0100 onwards, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus an end-of-document token 256."""

    kind = "byte"

    def __init__(self):
        self.vocab_size, self.eos_id = 257, 256
        self.token_bytes = torch.cat([torch.ones(256, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": "byte"})

    @property
    def fingerprint(self) -> str:
        return "byte"


class WordIds(dict):
    """A word's token ids as the bytes of a `dtype` array, computed by the BPE model on first
    sight: text is mostly words seen before, and a dict lookup is far cheaper than BPE. Emptied
    when it reaches `capacity` words, so an unbounded vocabulary of words bounds its memory."""

    def __init__(self, model, dtype, capacity: int = 2**20):
        super().__init__()
        self.model, self.dtype, self.capacity = model, dtype, capacity
        self.spell = str.maketrans({chr(b): c for b, c in byte_level_alphabet().items()})

    def __missing__(self, word: str) -> bytes:
        if len(self) >= self.capacity:
            self.clear()
        spelt = word.encode("utf-8").decode("latin-1").translate(self.spell)
        ids = self[word] = np.array([t.id for t in self.model.tokenize(spelt)], self.dtype).tobytes()
        return ids


class BPETokenizer:
    """A 🤗 tokenizers byte-level BPE: every token is a byte string, so its byte count is the
    length of its byte-level alphabet spelling.

    Encoding splits text into words with the pre-tokenizer's pattern and looks each word up
    (`WordIds`), the BPE model running once per distinct word: the same tokens as the 🤗
    tokenizer's `encode`, several times faster, except that text spelling the end-of-document
    token is encoded as text, never as the special token."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS)
        self.token_bytes = torch.tensor(
            [0 if t == EOS else len(t) for t in (tokenizer.id_to_token(i) for i in range(self.vocab_size))]
        )
        self.dtype = token_dtype(self.vocab_size)
        self.words = WordIds(tokenizer.model, self.dtype)

    @classmethod
    def train(cls, texts: Iterable[str] | Iterable[list[str]], vocab_size: int) -> BPETokenizer:
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
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        words = self.words.__getitem__
        return [np.frombuffer(b"".join(map(words, WORDS.findall(t))), self.dtype) for t in texts]

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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        dtype = token_dtype(self.vocab_size)
        return [np.asarray(ids, dtype) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

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


def trained_bpe(corpus: str, documents, vocab_size: int, max_documents: int) -> BPETokenizer:
    """A BPE trained once per (corpus, vocab_size, max_documents) and kept in datasets' cache:
    a later run, or another process of this one, loads it instead of training again.
    `documents()` gives the training texts (a capped sample of the corpus), in batches."""
    key = hashlib.sha1(f"{corpus}-{vocab_size}-{max_documents}".encode()).hexdigest()[:20]

    def train(tmp: Path):
        log.info(f"training a byte-level BPE of {vocab_size} tokens on at most {max_documents} documents")
        BPETokenizer.train(documents(), vocab_size).tokenizer.save(str(tmp))

    path = built_by_one(cache_root() / "tokenizers" / f"{key}.json", train, "the BPE tokenizer")
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(path)))


def build_tokenizer(kind: str, corpus: str, documents, vocab_size: int, max_documents: int, name: str | None):
    """The tokenizer `data.tokenizer` names; a BPE is trained (once) on `documents()`."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return trained_bpe(corpus, documents, vocab_size, max_documents)
    if kind == "auto":
        if not name:
            raise ConfigError("data.tokenizer=auto needs data.tokenizer_name (e.g. gpt2).")
        return AutoTokenizer(name)
    raise ConfigError(f"data.tokenizer={kind!r}: use byte, bpe or auto.")
