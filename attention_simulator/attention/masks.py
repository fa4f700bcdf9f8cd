"""Right-padded batches <-> packed variable-length tensors (for fused varlen kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpad(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, ...) with sequence b in its first lengths[b] rows -> (packed (total, ...), index)."""
    real = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    index = real.flatten().nonzero().squeeze(1)
    return x.flatten(0, 1)[index], index


def pad(packed: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Inverse of `unpad`: zeros at padded positions, (B, T, ...)."""
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    return out.index_copy(0, index, packed).view(batch, length, *packed.shape[1:])


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0+l1, ...] as int32, the offsets varlen kernels take."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
