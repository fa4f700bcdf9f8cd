"""Right-padded batches: where the real tokens are, and packing them for varlen kernels.

A `Padding` is computed once per batch, on the device and without a host sync, and shared by
every layer. Packing is a permutation rather than a gather of the real rows (whose number the
host would have to know): the real rows come first, in order, and the padded rows after them,
beyond `cu_seqlens[-1]`, where varlen kernels never look. Rows packed from or unpacked to padded
positions are zeroed with `torch.where`, so whatever a kernel leaves there -- even NaN in
uninitialised memory -- reaches neither the output nor any gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Padding:
    """A right-padded batch: sequence b holds its first lengths[b] of T positions."""

    lengths: torch.Tensor  # (B,) int64
    real: torch.Tensor  # (B, T) bool: True at real positions
    order: torch.Tensor  # (B·T,) flat positions, the real ones first (in order), then the padded ones
    cu_seqlens: torch.Tensor  # (B + 1,) int32: [0, l0, l0 + l1, ...], what varlen kernels take

    @classmethod
    def of(cls, lengths: torch.Tensor, length: int) -> Padding:
        lengths = lengths.long()
        real = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        order = torch.argsort(~real.flatten(), stable=True)  # False (real) sorts first, stable keeps the order
        return cls(lengths, real, order, F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32))

    @property
    def max_len(self) -> int:
        return self.real.shape[1]

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, T) mask shaped to broadcast against x (B, T, ...)."""
        return self.real.reshape(*self.real.shape, *(1,) * (x.ndim - 2))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, ...) -> (B·T, ...): the real rows first; padded rows (zeros) after them."""
        return torch.where(self._real(x), x, 0).flatten(0, 1)[self.order]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack`: (B·T, ...) -> (B, T, ...) with zeros at padded positions."""
        out = torch.empty_like(packed).index_copy(0, self.order, packed)
        out = out.view(*self.real.shape, *packed.shape[1:])
        return torch.where(self._real(out), out, 0)


@dataclass(frozen=True)
class Documents:
    """Documents packed into (B, T) blocks, attended separately: no attention across a boundary.

    Attention regroups a block batch into a right-padded batch of documents (N, L) -- one row
    per document piece in a block -- runs any backend on it as an ordinary padded batch (so b =
    −log n uses each document's own length, and RoPE restarts at each document), and scatters
    the rows back. `index` (N, L) holds each document's flat positions in the B·T block batch;
    padded slots hold B·T, a spare zero row. The loader computes it on the host, so regrouping
    needs no host sync."""

    index: torch.Tensor  # (N, L) int64
    padding: Padding  # (N, L): each document's length

    @classmethod
    def of(cls, index: torch.Tensor, lengths: torch.Tensor) -> Documents:
        return cls(index, Padding.of(lengths, index.shape[1]))

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, L, ...), zeros at padded slots."""
        flat = x.flatten(0, 1)
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])  # the spare row, B·T
        return flat[self.index]

    def ungroup(self, y: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """(N, L, ...) -> (B, T, ...); positions in no document come back zero. Padded slots
        land on the spare row, which is dropped (so neither they nor their gradient count)."""
        flat = y.new_zeros(batch * length + 1, *y.shape[2:]).index_copy(0, self.index.flatten(), y.flatten(0, 1))
        return flat[:-1].view(batch, length, *y.shape[2:])


def document_index(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row document ids (B, T) -- ascending within a row, −1 where no document is (padding)
    -> (`index` (N, L), `lengths` (N,)) for `Documents.of`: one row per (block, document)."""
    batch, length = ids.shape
    keys = torch.where(ids >= 0, torch.arange(batch)[:, None] * (length + 1) + ids, -1).flatten()  # (B·T,)
    real = keys >= 0
    positions = torch.arange(batch * length)[real]
    _, lengths = torch.unique_consecutive(keys[real], return_counts=True)  # (N,)
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(int(lengths.max()) if len(lengths) else 0)  # (L,)
    inside = offsets[None, :] < lengths[:, None]  # (N, L)
    gathered = positions[(starts[:, None] + offsets[None, :]).clamp(max=max(len(positions) - 1, 0))]
    return torch.where(inside, gathered, batch * length), lengths
