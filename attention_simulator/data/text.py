"""Language-modelling text through 🤗 datasets: documents -> tokens -> packed fixed-length blocks.

`pydoc` (default) is the English reference text inside every CPython (`pydoc_data.topics`,
~0.47 MB, 79 documents), split into train / validation by document. Other corpora load by Hub
id or from a local copy (`data.path`: a dataset saved with `save_to_disk` with a `text` column,
or a folder of .txt files, one document each).

Each split is tokenised once into a flat token stream (documents joined by the end-of-document
token) stored as a memory-mapped file in 🤗 datasets' cache, keyed by the split's and the
tokenizer's fingerprints; blocks are windows of that stream, so no padding is computed and a
corpus larger than memory works.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DatasetUnavailableError
from .loader import EpochBatchSampler, KeyedDataset, check_batch_sizes, eval_batches, make_loader
from .masking import BertMasking, MaskedBlocks, with_documents
from .sources import load_from_hub, local_root
from .tokenizers import build_tokenizer

HUB = {  # name -> (Hub id, configuration, train split, validation split)
    "tiny_shakespeare": ("karpathy/tiny_shakespeare", None, "train", "validation"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation"),
    "c4_realnewslike": ("allenai/c4", "realnewslike", "train", "validation"),
    "openwebtext": ("Skylion007/openwebtext", None, "train", None),
}


def load_pydoc() -> datasets.DatasetDict:
    """CPython's pydoc topics; every 10th document (by name) is validation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    split = {"train": [n for i, n in enumerate(names) if i % 10 != 5], "validation": names[5::10]}
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"title": ns, "text": [topics[n] for n in ns]}) for s, ns in split.items()}
    )


def _by_document(dataset: datasets.Dataset) -> datasets.DatasetDict:
    """One split into train / validation: every 20th document is validation."""
    index = np.arange(len(dataset))
    return datasets.DatasetDict(
        {"train": dataset.select(index[index % 20 != 10]), "validation": dataset.select(index[10::20])}
    )


def load_text_dataset(name: str, path: str | None) -> datasets.DatasetDict:
    if name == "pydoc" and path is None:
        return load_pydoc()
    if name not in HUB and path is None:
        raise ConfigError(f"data.name={name!r} is not a text dataset; choose pydoc, {', '.join(HUB)} or set data.path.")
    how_to = (
        "Point data.path at a local copy: a dataset saved with save_to_disk (train / validation splits with a "
        "'text' column) or a folder of .txt files (one document each)"
    )
    if path is not None:
        root = local_root(name, path, how_to)
        if (root / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(root))
            return loaded if "validation" in loaded else _by_document(loaded["train"])
        files = sorted(str(p) for p in root.rglob("*.txt"))
        if not files:
            raise DatasetUnavailableError(f"Dataset {name!r}: no .txt files under data.path={str(root)!r}. {how_to}.")
        return _by_document(datasets.load_dataset("text", data_files=files, sample_by="document", split="train"))
    hub_id, config, train, validation = HUB[name]
    loaded = load_from_hub(name, hub_id, config, how_to)
    if validation is None:
        return _by_document(loaded[train])
    return datasets.DatasetDict({"train": loaded[train], "validation": loaded[validation]})


def token_stream(split: datasets.Dataset, tokenizer, what: str) -> np.ndarray:
    """The split's documents as one token stream, each followed by EOS (a cached memmap)."""
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "attention_simulator" / "tokens"
    key = hashlib.sha1(f"{split._fingerprint}-{tokenizer.fingerprint}".encode()).hexdigest()[:20]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    path = cache / f"{key}.{np.dtype(dtype).name}"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            for row in tqdm(split, desc=f"tokenising {what}", unit="doc", leave=False):
                np.asarray(tokenizer.encode(row["text"]) + [tokenizer.eos_id], dtype=dtype).tofile(f)
        os.replace(tmp, path)  # atomic: a half-written stream is never found
    return np.memmap(path, dtype=dtype, mode="r")


class PackedBlocks:
    """Non-overlapping windows of a token stream: inputs stream[i·L : (i+1)·L], targets shifted by one."""

    def __init__(self, stream: np.ndarray, length: int, token_bytes: torch.Tensor, max_blocks: int | None = None):
        self.stream, self.length, self.token_bytes = stream, length, token_bytes
        self.count = (len(stream) - 1) // length
        if max_blocks is not None:
            self.count = min(self.count, max_blocks)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = np.stack([self.stream[i * self.length : (i + 1) * self.length + 1] for i in indices]).astype(np.int64)
        rows = torch.from_numpy(rows)  # (B, L + 1)
        targets = rows[:, 1:]
        return {"inputs": rows[:, :-1], "targets": targets, "target_bytes": self.token_bytes[targets]}


class _Batches:
    """The transform of next-token blocks: as they are, or with their document layout."""

    def __init__(self, eos_id: int | None):
        self.eos_id = eos_id  # None: documents attend across boundaries

    def __call__(self, rows, generators):
        if self.eos_id is None:
            return rows
        return with_documents(rows, rows["inputs"], torch.ones_like(rows["inputs"], dtype=torch.bool), self.eos_id)


class TextData:
    """Batches {"inputs": (B, L) int64, "targets": (B, L), "target_bytes": (B, L)} of packed text
    for next-token prediction; with `masking`, masked-modelling batches (see `masking.py`):
    {"inputs", "targets" (IGNORE where not predicted), "lengths"}. With `document_masks`, also
    {"doc_index", "doc_lengths"}: the model's attention stays inside each document."""

    def __init__(
        self,
        *,
        name: str = "pydoc",
        path: str | None = None,
        tokenizer: str = "byte",
        vocab_size: int = 1024,
        tokenizer_name: str | None = None,
        seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 32,
        eval_seq_lens: list[int] | None = None,
        eval_max_tokens: int = 2**20,
        num_workers: int = 0,
        masking: float | None = None,
        document_masks: bool = False,
    ):
        if seq_len < 1:
            raise ConfigError(f"data.seq_len={seq_len} must be >= 1.")
        if masking is not None and not 0 < masking < 1:
            raise ConfigError(f"data.masking={masking}: the fraction of tokens to predict, in (0, 1); null = off.")
        self.masking, self.document_masks = masking, document_masks
        check_batch_sizes(batch_size, eval_batch_size)
        self.name, self.seq_len = name, seq_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.eval_seq_lens = sorted(set(eval_seq_lens or [seq_len]) | {seq_len})
        self.eval_max_tokens = eval_max_tokens
        self.splits = load_text_dataset(name, path)
        texts = (row["text"] for row in self.splits["train"])
        self.tokenizer = build_tokenizer(tokenizer, texts, vocab_size, tokenizer_name)
        self.streams = {s: token_stream(self.splits[s], self.tokenizer, f"{name}/{s}") for s in ("train", "validation")}
        if len(self.streams["validation"]) <= max(self.eval_seq_lens):
            raise ConfigError(
                f"The {name!r} validation split has {len(self.streams['validation'])} tokens: too few for "
                f"evaluating at length {max(self.eval_seq_lens)}; lower data.eval_seq_lens."
            )

    @property
    def kind(self) -> str:
        """What a task must train on: next-token text, or masked-modelling text."""
        return "text" if self.masking is None else "masked_text"

    @property
    def model_args(self) -> dict:
        """What the model needs from the data: the vocabulary size (+ the mask token)."""
        return {"vocab_size": self.tokenizer.vocab_size + (self.masking is not None)}

    def _dataset(self, split: str, length: int, seed: int, max_blocks: int | None = None) -> KeyedDataset:
        stream, eos = self.streams[split], self.tokenizer.eos_id
        if self.masking is None:
            blocks = PackedBlocks(stream, length, self.tokenizer.token_bytes, max_blocks)
            return KeyedDataset(blocks, _Batches(eos if self.document_masks else None), seed)
        vocab = self.tokenizer.vocab_size
        masking = BertMasking(self.masking, vocab, eos, mask_id=vocab, documents=self.document_masks)
        return KeyedDataset(MaskedBlocks(stream, length, pad_id=eos, max_blocks=max_blocks), masking, seed)

    def state_dict(self) -> dict:
        """Saved in checkpoints, so a run can be sampled from (attention_simulator.generate)."""
        return {"tokenizer": self.tokenizer.to_json()}

    def train_loader(self, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        dataset = self._dataset("train", self.seq_len, seed)
        sampler = EpochBatchSampler(len(dataset), self.batch_size, seed, start, rank, world_size)
        return make_loader(dataset, sampler, self.num_workers)

    def eval_loaders(self, rank: int = 0, world_size: int = 1) -> dict:
        """One loader per evaluation length; the training length's key is "" (eval/loss), the
        others "@LEN" (eval/loss@512). Each sees at most eval_max_tokens tokens."""
        loaders = {}
        for length in self.eval_seq_lens:
            dataset = self._dataset("validation", length, 0, max_blocks=max(1, self.eval_max_tokens // length))
            per_batch = max(1, self.eval_batch_size * self.seq_len // length)
            batches = eval_batches(len(dataset), per_batch, rank, world_size)
            key = "" if length == self.seq_len else f"@{length}"
            loaders[key] = make_loader(dataset, batches, self.num_workers)
        return loaders
