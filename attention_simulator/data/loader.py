"""Resumable, reproducible batching shared by every task's data.

Batches are lists of `(epoch, index)` keys drawn from a per-epoch permutation seeded by
`(seed, epoch)`, and each sample's augmentation uses a generator seeded by `(seed, epoch,
index)`. So a batch is a pure function of its position: resuming needs only the number of
batches consumed, and results do not depend on the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError

Key = tuple[int, int]  # (epoch, index)


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): distinct parts, unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def check_batch_sizes(batch_size: int, eval_batch_size: int):
    for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1 (samples per process and batch).")


class EpochBatchSampler(Sampler[list[Key]]):
    """Infinite training batches (drop_last) starting at batch `start`; each rank takes its slice."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise ValueError(f"{num_items} training items cannot fill one batch of {global_batch}; lower batch_size.")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.batches_per_epoch = num_items // global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The item order of an epoch; global batch i is its i-th slice of batch_size × world_size."""
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        return torch.randperm(self.num_items, generator=g).tolist()

    def __iter__(self) -> Iterator[list[Key]]:
        batch, order_epoch, order = self.start, None, None
        while True:
            epoch, i = divmod(batch, self.batches_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            lo = (i * self.world_size + self.rank) * self.batch_size
            yield [(epoch, idx) for idx in order[lo : lo + self.batch_size]]
            batch += 1


class LengthGroupedBatchSampler(EpochBatchSampler):
    """EpochBatchSampler whose batches hold items of similar length (little padding): each
    epoch's permutation is cut into groups of `group_batches` global batches, each group is
    sorted by length and cut into batches, and the batches are shuffled."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, group_batches: int = 20):  # fmt: skip
        super().__init__(len(lengths), batch_size, seed, start, rank, world_size)
        self.lengths, self.group_batches = torch.as_tensor(lengths), group_batches

    def epoch_order(self, epoch: int) -> list[int]:
        global_batch = self.batch_size * self.world_size
        perm = torch.tensor(super().epoch_order(epoch)[: self.batches_per_epoch * global_batch])
        group = global_batch * self.group_batches
        # a stable sort of each group by length (longest first), keeping the shuffled order among ties
        groups = [g[torch.argsort(self.lengths[g], descending=True, stable=True)] for g in perm.split(group)]
        batches = torch.cat(groups).view(self.batches_per_epoch, global_batch)
        shuffle = torch.randperm(
            self.batches_per_epoch, generator=torch.Generator().manual_seed(seed_for(self.seed, epoch, 1))
        )
        return batches[shuffle].flatten().tolist()


def eval_batches(num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[Key]]:
    """Every item once, in order, strided over ranks (epoch 0: no augmentation applies)."""
    mine = list(range(rank, num_items, world_size))
    return [[(0, i) for i in mine[lo : lo + batch_size]] for lo in range(0, len(mine), batch_size)]


IN_MEMORY_BYTES = 64 * 2**20


class InMemoryRows:
    """A small dataset's columns held as tensors (or lists), so a batch is an index rather
    than a pass through 🤗 datasets' row formatting (≈15 ms per batch of digits)."""

    def __init__(self, dataset):
        self.columns = dataset.with_format("torch")[:]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, indices: list[int]) -> dict:
        return {
            k: v[indices] if isinstance(v, torch.Tensor) else [v[i] for i in indices] for k, v in self.columns.items()
        }


def rows_source(dataset):
    """What KeyedDataset reads from: small datasets materialised once, large ones as they are."""
    if dataset.data.nbytes <= IN_MEMORY_BYTES:
        return InMemoryRows(dataset)
    return dataset.with_format("torch")


class KeyedDataset(Dataset):
    """Rows of `source` turned into a batch by `transform(rows, generators)`.

    `source[list_of_indices]` must return the rows (a 🤗 `datasets.Dataset` returns a dict of
    columns), or a source with a `keyed` method gets the (epoch, index) keys themselves (rows
    that depend on the epoch: `text.PackedBlocks` with shifted windows); one generator per row
    is seeded by (seed, epoch, index).
    """

    def __init__(self, source, transform: Callable, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, keys: Sequence[Key]):
        rows = self.source.keyed(keys) if hasattr(self.source, "keyed") else self.source[[i for _, i in keys]]
        generators = [torch.Generator().manual_seed(seed_for(self.seed, e, i)) for e, i in keys]
        return self.transform(rows, generators)

    def __getitem__(self, key: Key):  # DataLoader uses __getitems__; this keeps the Dataset protocol
        return self.__getitems__([key])


def _already_batched(batch):
    return batch


def make_loader(dataset: KeyedDataset, batches, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_already_batched,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would be one draw off from an uninterrupted run's
        generator=torch.Generator(),
    )
