"""Masked-modelling batches (BERT) from a token stream, and the document layout of packed blocks.

Blocks are consecutive windows of the stream, the last one padded rather than dropped. In each
block a fixed fraction of the text tokens (end-of-document tokens excluded) is chosen to be
predicted; of those, 80 % are replaced by the mask token, 10 % by a random token, 10 % kept (Devlin
et al. 2019). The choice is drawn from each block's own generator (seeded by its key, as every
augmentation here), so evaluation masks are the same in every run and resumed runs are exact.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention.masks import document_index

IGNORE = -100  # target of a position that is not predicted (cross_entropy's ignore_index)


def document_ids(tokens: torch.Tensor, real: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) id of the document each token belongs to within its row (an end-of-document token
    closes its own document); −1 at padding."""
    ends = (tokens == eos_id).long()
    ids = torch.cumsum(ends, 1) - ends  # end-of-document tokens before this one
    return torch.where(real, ids, -1)


def first_rows(batch: dict, n: int) -> dict:
    """The first n blocks of a text batch: every value is batch-first except the document
    layout, whose pieces of those blocks are kept (the spare slot renumbered)."""
    rows = {k: v[:n] for k, v in batch.items() if k not in ("doc_index", "doc_lengths")}
    if "doc_index" in batch:
        batch_size, length = batch["inputs"].shape
        n = min(n, batch_size)
        index, keep = batch["doc_index"], batch["doc_index"][:, 0] < n * length  # documents run in block order
        lengths = batch["doc_lengths"][keep]
        index = index[keep][:, : int(lengths.max())]
        rows |= {"doc_index": torch.where(index == batch_size * length, n * length, index), "doc_lengths": lengths}
    return rows


def with_documents(batch: dict, tokens: torch.Tensor, real: torch.Tensor, eos_id: int) -> dict:
    """Add the (host-computed) regrouping of a batch into documents: see `masks.Documents`."""
    index, lengths = document_index(document_ids(tokens, real, eos_id))
    return batch | {"doc_index": index, "doc_lengths": lengths}


class MaskedBlocks:
    """Windows stream[i·L : (i+1)·L] of a token stream, the last one padded; `__getitem__`
    gives the original tokens (B, L) and their real lengths (B,)."""

    def __init__(self, stream: np.ndarray, length: int, pad_id: int, max_blocks: int | None = None):
        self.stream, self.length, self.pad_id = stream, length, pad_id
        self.count = -(-len(stream) // length)
        if max_blocks is not None:
            self.count = min(self.count, max_blocks)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.full((len(indices), self.length), self.pad_id, dtype=torch.int64)
        lengths = torch.zeros(len(indices), dtype=torch.int64)
        for r, i in enumerate(indices):
            piece = torch.from_numpy(self.stream[i * self.length : (i + 1) * self.length].astype(np.int64))
            rows[r, : len(piece)], lengths[r] = piece, len(piece)
        return rows, lengths


class BertMasking:
    """The transform of `KeyedDataset`: (tokens, lengths) + one generator per block -> {"inputs"
    (B, L) with masked tokens, "targets" (B, L) original token or IGNORE, "lengths" (B,)} and,
    with `documents`, the document layout."""

    def __init__(self, fraction: float, vocab_size: int, eos_id: int, mask_id: int, documents: bool):
        self.fraction, self.vocab_size, self.eos_id, self.mask_id = fraction, vocab_size, eos_id, mask_id
        self.documents = documents

    def __call__(self, rows: tuple[torch.Tensor, torch.Tensor], generators: list[torch.Generator]) -> dict:
        tokens, lengths = rows
        real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (B, L)
        inputs, targets = tokens.clone(), torch.full_like(tokens, IGNORE)
        for r, g in enumerate(generators):
            candidates = torch.nonzero(real[r] & (tokens[r] != self.eos_id))[:, 0]
            count = max(1, round(self.fraction * len(candidates))) if len(candidates) else 0
            chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]]
            targets[r, chosen] = tokens[r, chosen]
            how = torch.rand(count, generator=g)  # < 0.8: mask token; < 0.9: a random token; else kept
            random = torch.randint(self.vocab_size - 1, (count,), generator=g)
            random += random >= self.eos_id  # any token but the end of a document
            inputs[r, chosen] = torch.where(how < 0.8, self.mask_id, torch.where(how < 0.9, random, tokens[r, chosen]))
        batch = {"inputs": inputs, "targets": targets, "lengths": lengths}
        return with_documents(batch, tokens, real, self.eos_id) if self.documents else batch
