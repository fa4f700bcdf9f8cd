"""Right-padded batches <-> packed variable-length tensors (for fused varlen kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def real_positions(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) True at the positions a right-padded batch really holds."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def unpad(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, ...) with sequence b in its first lengths[b] rows -> (packed (total, ...), index)."""
    index = real_positions(lengths, x.shape[1]).flatten().nonzero().squeeze(1)
    return x.flatten(0, 1)[index], index


def pad(packed: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Inverse of `unpad`: zeros at padded positions, (B, T, ...)."""
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    return out.index_copy(0, index, packed).view(batch, length, *packed.shape[1:])


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0+l1, ...] as int32, the offsets varlen kernels take."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
