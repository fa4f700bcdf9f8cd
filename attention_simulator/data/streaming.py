"""Corpora that do not fit on disk (`data.streaming=true`): a 🤗 streaming dataset tokenised as
it is read and packed into the same blocks as a token stream on disk, resumable at the document
and token where it stopped.

Each data-parallel process reads its own share of the documents (`split_dataset_by_node`: whole
files when they divide evenly, else every N-th document), optionally through a seeded shuffle
buffer, in epochs. A batch carries the position after it, (epoch, document, token): the
documents of this process's stream before the one in progress, and how many tokens of that one
are used. A checkpoint keeps every process's position; resuming skips that many documents
(read, not tokenised) and that many tokens, and continues with the same tokens an
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

Position = tuple[int, int, int]  # (epoch, documents before the current one, its tokens already used)
ENCODE_DOCUMENTS = 64  # documents tokenised per call


def corpus_id(name: str, path: str | None, hub: tuple | None) -> str:
    """What identifies a streamed corpus (the key of its cached BPE): its files' names, sizes and
    modification times for a local copy, else its Hub id (or name, for the bundled text)."""
    if path is None:
        return f"{name}-{hub}"
    files = sorted(p for p in Path(path).expanduser().rglob("*") if p.is_file())
    stats = "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
    return f"{name}-" + hashlib.sha1(stats.encode()).hexdigest()


def encoded(documents: datasets.IterableDataset, tokenizer) -> Iterator[np.ndarray]:
    """Each document's tokens followed by the end-of-document token, a few documents per call."""
    eos = np.array([tokenizer.eos_id], np.int64)
    for batch in documents.select_columns(["text"]).iter(batch_size=ENCODE_DOCUMENTS):
        for ids in tokenizer.encode_batch(batch["text"]):
            yield np.concatenate([ids.astype(np.int64), eos])


def first_tokens(documents: datasets.IterableDataset, tokenizer, count: int) -> np.ndarray:
    """The stream's first `count` tokens (or all of them, if fewer): a validation set."""
    parts, held = [], 0
    for ids in encoded(documents, tokenizer):
        parts.append(ids)
        held += len(ids)
        if held >= count:
            break
    return np.concatenate(parts)[:count] if parts else np.zeros(0, np.int64)


class PackedStream(torch.utils.data.IterableDataset):
    """Batches of `batch_size` consecutive blocks of `length` + 1 tokens (each block starts at the
    previous one's last token, as `text.PackedBlocks`) from this process's documents; each batch
    carries its end position (see the module's docstring)."""

    def __init__(self, documents: datasets.IterableDataset, tokenizer, length: int, batch_size: int,
                 position: Position, transform, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 seed: int = 0):  # fmt: skip
        self.documents = split_dataset_by_node(documents, rank, world_size)
        if shuffle_buffer:
            self.documents = self.documents.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.tokenizer, self.length, self.batch_size = tokenizer, length, batch_size
        self.position, self.transform = position, transform

    def epoch(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """An epoch's documents from the `skip`-th on (a shuffled stream reshuffles by epoch)."""
        self.documents.set_epoch(epoch)
        return encoded(self.documents.skip(skip) if skip else self.documents, self.tokenizer)

    def __iter__(self):
        start_epoch, start_document, start_token = self.position
        need = self.batch_size * self.length + 1
        tokens = np.zeros(0, np.int64)
        held: deque[list[int]] = deque()  # [epoch, document, first token, count] of each part of `tokens`
        epoch = start_epoch
        while True:
            first = start_document if epoch == start_epoch else 0
            read = 0
            for document, ids in enumerate(self.epoch(epoch, first), start=first):
                read += 1
                skip = start_token if (epoch, document) == (start_epoch, start_document) else 0
                tokens = np.concatenate([tokens, ids[skip:]])
                held.append([epoch, document, skip, len(ids) - skip])
                while len(tokens) >= need:
                    rows = np.lib.stride_tricks.sliding_window_view(tokens[:need], self.length + 1)[:: self.length]
                    rows = torch.from_numpy(np.ascontiguousarray(rows))  # (B, L + 1)
                    tokens = tokens[need - 1 :]
                    used = need - 1
                    while used:  # the parts the batch used up, and how far into the next one
                        take = min(used, held[0][3])
                        held[0][2] += take
                        held[0][3] -= take
                        used -= take
                        if not held[0][3]:
                            held.popleft()
                    targets = rows[:, 1:]
                    batch = {"inputs": rows[:, :-1], "targets": targets,
                             "target_bytes": self.tokenizer.token_bytes[targets]}  # fmt: skip
                    yield self.transform(batch, None) | {"position": tuple(held[0][:3])}
            if not read and first == 0:
                raise ValueError("the training stream has no documents for this process")
            epoch += 1
