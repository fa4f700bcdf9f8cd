"""Language-modelling text through 🤗 datasets: documents -> tokens -> packed fixed-length blocks.

`pydoc` (default) is the English reference text inside every CPython (`pydoc_data.topics`,
~0.47 MB, 79 documents), split into train / validation by document. Other corpora load by Hub
id or from a local copy (`data.path`: a dataset saved with `save_to_disk` with a `text` column,
or a folder of .txt files, one document each).

Each split is tokenised once into a flat token stream (documents joined by the end-of-document
token) stored as a memory-mapped file in 🤗 datasets' cache, keyed by the split's and the
tokenizer's fingerprints (`tokens.py`); blocks are windows of that stream, so no padding is
computed and a corpus larger than memory works. A BPE is trained once on a sample of
`tokenizer_train_docs` documents and cached the same way. With `streaming`, documents are read
and tokenised as training goes (`streaming.py`).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..distributed import gather_objects
from ..errors import ConfigError, DatasetUnavailableError
from .loader import EpochBatchSampler, KeyedDataset, check_batch_sizes, eval_batches, make_loader, seed_for
from .masking import BertMasking, MaskedBlocks, with_documents
from .sources import load_from_hub, local_root
from .streaming import PackedStream, Position, corpus_id, first_tokens
from .tokenizers import build_tokenizer
from .tokens import token_stream

HUB = {  # name -> (Hub id, configuration, train split, validation split)
    "tiny_shakespeare": ("karpathy/tiny_shakespeare", None, "train", "validation"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation"),
    "c4_realnewslike": ("allenai/c4", "realnewslike", "train", "validation"),
    "openwebtext": ("Skylion007/openwebtext", None, "train", None),  # no validation split: cut by document
}


def load_pydoc() -> datasets.DatasetDict:
    """CPython's pydoc topics; every 10th document (by name) is validation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    split = {"train": [n for i, n in enumerate(names) if i % 10 != 5], "validation": names[5::10]}
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"title": ns, "text": [topics[n] for n in ns]}) for s, ns in split.items()}
    )


def _by_document(dataset):
    """One split into train / validation: every 20th document is validation."""
    if isinstance(dataset, datasets.IterableDataset):
        return {"train": dataset.filter(lambda _, i: i % 20 != 10, with_indices=True),
                "validation": dataset.filter(lambda _, i: i % 20 == 10, with_indices=True)}  # fmt: skip
    index = np.arange(len(dataset))
    return datasets.DatasetDict(
        {"train": dataset.select(index[index % 20 != 10]), "validation": dataset.select(index[10::20])}
    )


def load_text_dataset(name: str, path: str | None, streaming: bool = False, hub_config: str | None = None,
                      text_column: str = "text"):  # fmt: skip
    """{"train", "validation"}: datasets, or with `streaming` 🤗 IterableDatasets read as they go.
    `name` is pydoc, a corpus of `HUB`, or any Hub id (`owner/dataset`, with `hub_config`); a
    split without validation is cut into train / validation by document. `text_column` is
    renamed to "text"."""
    loaded = _load_text_dataset(name, path, streaming, hub_config)
    if text_column == "text":
        return loaded
    columns = loaded["train"].column_names
    if columns is not None and text_column not in columns:
        raise ConfigError(f"data.text_column={text_column!r}: dataset {name!r} has columns {columns}.")
    return {s: d.rename_column(text_column, "text") for s, d in loaded.items()}


def _load_text_dataset(name: str, path: str | None, streaming: bool, hub_config: str | None):
    if name == "pydoc" and path is None:
        loaded = load_pydoc()
        return {s: d.to_iterable_dataset() for s, d in loaded.items()} if streaming else loaded
    if name not in HUB and "/" not in name and path is None:
        raise ConfigError(
            f"data.name={name!r} is not a text dataset; choose pydoc, {', '.join(HUB)}, a Hub id (owner/dataset, e.g. "
            "data=hub_text data.name=roneneldan/TinyStories) or set data.path."
        )
    how_to = (
        "Point data.path at a local copy: a dataset saved with save_to_disk (train / validation splits with a "
        "'text' column, or data.text_column) or a folder of .txt files (one document each)"
    )
    if path is not None:
        root = local_root(name, path, how_to)
        if (root / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(root))
            if streaming:
                loaded = {s: d.to_iterable_dataset(num_shards=max(1, len(d.cache_files))) for s, d in loaded.items()}
            return loaded if "validation" in loaded else _by_document(loaded["train"])
        files = sorted(str(p) for p in root.rglob("*.txt"))
        if not files:
            raise DatasetUnavailableError(f"Dataset {name!r}: no .txt files under data.path={str(root)!r}. {how_to}.")
        text = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", streaming=streaming)
        return _by_document(text)
    hub_id, config, train, validation = HUB.get(name) or (name, hub_config, "train", "validation")
    loaded = load_from_hub(name, hub_id, config, how_to, streaming)
    if validation not in loaded:
        return _by_document(loaded[train])
    return {"train": loaded[train], "validation": loaded[validation]}


def sample_documents(split: datasets.Dataset, count: int, seed: int = 0):
    """Batches of the texts of at most `count` documents: all of them if the split has no more,
    else a seeded sample (in corpus order)."""
    if len(split) > count:
        split = split.select(np.sort(np.random.default_rng(seed).choice(len(split), count, replace=False)))
    for batch in split.select_columns(["text"]).iter(batch_size=1000):
        yield batch["text"]


SAMPLINGS = ("fixed", "shifted")


class PackedBlocks:
    """Non-overlapping windows of a token stream: inputs stream[o + i·L : o + (i+1)·L], targets
    shifted by one. o = 0 (`fixed`), or with `shift_seed` (`shifted`) a seeded offset in [0, L)
    drawn anew for each epoch: every epoch cuts the text at other places, and a resumed run
    draws the same offsets (they are functions of the seed and the epoch)."""

    def __init__(self, stream: np.ndarray, length: int, token_bytes: torch.Tensor, max_blocks: int | None = None,
                 shift_seed: int | None = None):  # fmt: skip
        self.stream, self.length, self.token_bytes, self.shift_seed = stream, length, token_bytes, shift_seed
        room = length - 1 if shift_seed is not None else 0  # the largest offset must still fit every block
        self.count = (len(stream) - 1 - room) // length
        if max_blocks is not None:
            self.count = min(self.count, max_blocks)

    def __len__(self) -> int:
        return self.count

    def offset(self, epoch: int) -> int:
        if self.shift_seed is None:
            return 0
        generator = torch.Generator().manual_seed(seed_for(self.shift_seed, epoch))
        return int(torch.randint(self.length, (), generator=generator))

    def keyed(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The blocks of (epoch, index) keys (what `KeyedDataset` hands a source with this method)."""
        offsets = {epoch: self.offset(epoch) for epoch, _ in keys}  # a batch spans at most an epoch or two
        starts = [offsets[epoch] + i * self.length for epoch, i in keys]
        rows = torch.from_numpy(np.stack([self.stream[s : s + self.length + 1] for s in starts]).astype(np.int64))
        targets = rows[:, 1:]  # rows: (B, L + 1)
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
        tokenizer_train_docs: int = 100_000,
        num_proc: int | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 0,
        hub_config: str | None = None,
        text_column: str = "text",
        sampling: str = "fixed",
    ):
        if seq_len < 1:
            raise ConfigError(f"data.seq_len={seq_len} must be >= 1.")
        if masking is not None and not 0 < masking < 1:
            raise ConfigError(f"data.masking={masking}: the fraction of tokens to predict, in (0, 1); null = off.")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"data.sampling={sampling!r}: use fixed (the same windows every epoch) or shifted (a "
                              "seeded offset per epoch).")  # fmt: skip
        if sampling == "shifted" and (streaming or masking is not None):
            raise ConfigError(
                "data.sampling=shifted moves the next-token windows of a tokenised corpus; streaming and masked "
                "modelling (data.masking) cut their own blocks: set data.sampling=fixed."
            )
        self.sampling = sampling
        if streaming and masking is not None:
            raise ConfigError("data.streaming=true gives next-token blocks; masked modelling (data.masking) reads a "
                              "tokenised corpus: set data.streaming=false.")  # fmt: skip
        counts = {"tokenizer_train_docs": tokenizer_train_docs, "num_proc": 1 if num_proc is None else num_proc}
        for key, value in counts.items():
            if value < 1:
                raise ConfigError(f"data.{key}={value} must be >= 1.")
        self.masking, self.document_masks = masking, document_masks
        check_batch_sizes(batch_size, eval_batch_size)
        self.name, self.seq_len = name, seq_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.eval_seq_lens = sorted(set(eval_seq_lens or [seq_len]) | {seq_len})
        self.eval_max_tokens = eval_max_tokens
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.position: Position = (0, 0, 0)  # streaming: this process's place in its documents
        self.path, self.num_proc, self.hub_config, self.text_column = path, num_proc, hub_config, text_column
        self.tokenizer_options = (tokenizer, vocab_size, tokenizer_train_docs, tokenizer_name)
        self.splits, self.tokenizer, self.streams = None, None, None  # prepare()

    def prepare(self) -> TextData:
        """The file work, once per object (each step cached on disk after a run's first): load
        the dataset, build or load the tokenizer, tokenise the splits. The trainer calls it after
        its start-up checks; what needs the tokens calls it first."""
        if self.streams is not None:
            return self
        name, (tokenizer, vocab_size, train_docs, tokenizer_name) = self.name, self.tokenizer_options
        self.splits = load_text_dataset(name, self.path, self.streaming, self.hub_config, self.text_column)
        train = self.splits["train"]
        if self.streaming:  # a BPE learns from the stream's first documents
            corpus = corpus_id(name, self.path, HUB.get(name) or self.hub_config)
            documents = lambda: (b["text"] for b in train.take(train_docs).iter(batch_size=1000))
        else:
            corpus, documents = train._fingerprint, lambda: sample_documents(train, train_docs)
        self.tokenizer = build_tokenizer(tokenizer, corpus, documents, vocab_size, train_docs, tokenizer_name)
        if self.streaming:  # validation: the validation stream's first tokens, enough for every length
            needed = self.eval_max_tokens + max(self.eval_seq_lens) + 1
            streams = {"validation": first_tokens(self.splits["validation"], self.tokenizer, needed)}
        else:
            streams = {s: token_stream(self.splits[s], self.tokenizer, f"{name}/{s}", self.num_proc)
                       for s in ("train", "validation")}  # fmt: skip
        if len(streams["validation"]) <= max(self.eval_seq_lens):
            raise ConfigError(
                f"The {name!r} validation split has {len(streams['validation'])} tokens: too few for "
                f"evaluating at length {max(self.eval_seq_lens)}; lower data.eval_seq_lens."
            )
        self.streams = streams
        return self

    @property
    def kind(self) -> str:
        """What a task must train on: next-token text, or masked-modelling text."""
        return "text" if self.masking is None else "masked_text"

    @property
    def longest_sequence(self) -> int:
        """The longest sequence a run feeds the model, in training or evaluation."""
        return max(self.eval_seq_lens)

    @property
    def model_args(self) -> dict:
        """What the model needs from the data: the vocabulary size (+ the mask token)."""
        return {"vocab_size": self.prepare().tokenizer.vocab_size + (self.masking is not None)}

    def _dataset(self, split: str, length: int, seed: int, max_blocks: int | None = None) -> KeyedDataset:
        stream, eos = self.streams[split], self.tokenizer.eos_id
        if self.masking is None:
            shift = seed if split == "train" and self.sampling == "shifted" else None  # evaluation: fixed blocks
            blocks = PackedBlocks(stream, length, self.tokenizer.token_bytes, max_blocks, shift)
            return KeyedDataset(blocks, _Batches(eos if self.document_masks else None), seed)
        vocab = self.tokenizer.vocab_size
        masking = BertMasking(self.masking, vocab, eos, mask_id=vocab, documents=self.document_masks)
        return KeyedDataset(MaskedBlocks(stream, length, pad_id=eos, max_blocks=max_blocks), masking, seed)

    def state_dict(self) -> dict:
        """Saved in checkpoints: the tokenizer (a run can be sampled from, attention_simulator.generate)
        and, streaming, every process's stream position (called on every process)."""
        state = {"tokenizer": self.prepare().tokenizer.to_json()}
        return state | ({"stream_positions": gather_objects(self.position)} if self.streaming else {})

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1):
        """A checkpoint's stream positions: this process continues where its predecessor stopped."""
        if not self.streaming:
            return
        positions = state.get("stream_positions")
        if positions is None:
            raise ConfigError("data.streaming=true, but the checkpoint was saved by a run that read a tokenised "
                              "corpus: resume it with data.streaming=false.")  # fmt: skip
        if len(positions) != world_size:
            raise ConfigError(
                f"The checkpoint's stream positions are those of {len(positions)} processes, this run has "
                f"{world_size}: each process streams its own share of the documents, so resume with "
                f"{len(positions)} processes."
            )
        self.position = tuple(positions[rank])

    def train_loader(self, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        """Training batches from global batch `start` on (streaming: from `self.position`)."""
        self.prepare()
        transform = _Batches(self.tokenizer.eos_id if self.document_masks else None)
        if self.streaming:
            blocks = PackedStream(self.splits["train"], self.tokenizer, self.seq_len, self.batch_size, self.position,
                                  transform, rank, world_size, self.shuffle_buffer, seed)  # fmt: skip
            return self._streamed(blocks)
        dataset = self._dataset("train", self.seq_len, seed)
        sampler = EpochBatchSampler(len(dataset), self.batch_size, seed, start, rank, world_size)
        return make_loader(dataset, sampler, self.num_workers)

    def _streamed(self, blocks: PackedStream):
        """The stream's batches; as each is taken, its end becomes this process's position."""
        loader = DataLoader(blocks, batch_size=None, num_workers=min(self.num_workers, 1),  # one reader: one order
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator())  # fmt: skip
        for batch in loader:
            self.position = tuple(int(x) for x in batch.pop("position"))
            yield batch

    def eval_loaders(self, rank: int = 0, world_size: int = 1) -> dict:
        """One loader per evaluation length; the training length's key is "" (eval/loss), the
        others "@LEN" (eval/loss@512). Each sees at most eval_max_tokens tokens."""
        self.prepare()
        loaders = {}
        for length in self.eval_seq_lens:
            dataset = self._dataset("validation", length, 0, max_blocks=max(1, self.eval_max_tokens // length))
            per_batch = max(1, self.eval_batch_size * self.seq_len // length)
            batches = eval_batches(len(dataset), per_batch, rank, world_size)
            key = "" if length == self.seq_len else f"@{length}"
            loaders[key] = make_loader(dataset, batches, self.num_workers)
        return loaders
