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
