"""A corpus split as one token stream on disk: documents joined by the end-of-document token,
tokenised once per (split fingerprint, tokenizer fingerprint) and memory-mapped by every run
and process after that.

The build is `datasets.Dataset.map(batched=True, num_proc=N)` over the documents (each batch
tokenised by the tokenizer's `encode_batch`, its documents' tokens written as one Arrow row), then
the rows are copied in order into the stream file; neither step holds the corpus in memory.
It is written to a temporary folder renamed into place (`sources.built_by_one`): an interrupted
build is never read, and under torchrun one process per machine builds while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import datasets
import numpy as np

from .sources import built_by_one, cache_root
from .tokenizers import token_dtype

log = logging.getLogger(__name__)

DOCUMENTS_PER_PROCESS = 2000  # below this, one process: starting more costs more than it saves
BATCH_DOCUMENTS = 1000


def default_num_proc(documents: int) -> int:
    """One process per available core for a large split, one for a small one."""
    return max(1, min(len(os.sched_getaffinity(0)), documents // DOCUMENTS_PER_PROCESS))


class EncodeDocuments:
    """The map function: a batch of documents -> one row holding their tokens, each document
    followed by the end-of-document token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.dtype = tokenizer, token_dtype(tokenizer.vocab_size)

    def __call__(self, batch: dict) -> dict:
        eos = np.array([self.tokenizer.eos_id], self.dtype)
        parts = [piece for ids in self.tokenizer.encode_batch(batch["text"]) for piece in (ids.astype(self.dtype), eos)]
        return {"ids": [np.concatenate(parts)]}


def token_stream(split: datasets.Dataset, tokenizer, what: str, num_proc: int | None = None) -> np.memmap:
    """The split's documents as one token stream, each followed by EOS (a cached memmap)."""
    dtype = token_dtype(tokenizer.vocab_size)
    key = hashlib.sha1(f"{split._fingerprint}-{tokenizer.fingerprint}".encode()).hexdigest()[:20]
    folder = built_by_one(
        cache_root() / "tokens" / key,
        lambda tmp: write_stream(split, tokenizer, tmp, what, num_proc or default_num_proc(len(split))),
        f"the {what} tokens",
    )
    return np.memmap(folder / f"tokens.{np.dtype(dtype).name}", dtype=dtype, mode="r")


def write_stream(split: datasets.Dataset, tokenizer, folder: Path, what: str, num_proc: int):
    """Tokenise `split` into `folder`/tokens.<dtype> (and a summary, stream.json)."""
    dtype = token_dtype(tokenizer.vocab_size)
    folder.mkdir(parents=True)
    if num_proc > 1:  # each process tokenises on one thread (and tokenizers' fork warning is moot)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    rows = split.select_columns(["text"]).map(
        EncodeDocuments(tokenizer),
        batched=True,
        batch_size=BATCH_DOCUMENTS,
        writer_batch_size=4,  # a row is a thousand documents' tokens
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value(np.dtype(dtype).name))}),
        cache_file_name=str(folder / "rows.arrow"),
        load_from_cache_file=False,
        new_fingerprint=folder.name,  # not a hash of the tokenizer and its word cache
        desc=f"tokenising {what} ({num_proc} process{'es' if num_proc > 1 else ''})",
    )
    tokens = 0
    with open(folder / f"tokens.{np.dtype(dtype).name}", "wb") as f:
        for chunk in rows.data.table.column("ids").chunks:
            values = np.asarray(chunk.flatten())
            values.tofile(f)
            tokens += len(values)
    del rows
    for arrow in folder.glob("rows*.arrow"):
        arrow.unlink()
    seconds = time.perf_counter() - start
    summary = {"documents": len(split), "tokens": tokens, "seconds": round(seconds, 2), "processes": num_proc}
    (folder / "stream.json").write_text(json.dumps(summary))
    log.info(f"tokenised {what}: {len(split)} documents, {tokens} tokens in {seconds:.1f} s "
             f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")  # fmt: skip
