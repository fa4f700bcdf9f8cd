"""The key/value cache of one attention layer, for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated for a
    batch: sequence b holds its first lengths[b] tokens (prompts of different lengths decode
    together, each at its own position)."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, device=None, dtype=None):
        self.k = torch.zeros(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.filled = 0  # tokens written to the longest row: the keys a step reads

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, t, Hk, D) keys and values at each sequence's end; return the first
        `filled` rows (B, Tk, Hk, D) for attention (rows past a sequence's length are padding)."""
        self.check_room(k.shape[1])
        pos = self.lengths[:, None].long() + torch.arange(k.shape[1], device=k.device)  # (B, t)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, pos], self.v[rows, pos] = k, v
        return self.k[:, : self.filled + k.shape[1]], self.v[:, : self.filled + k.shape[1]]

    def check_room(self, new: int):
        """Raise unless `new` more tokens fit behind the longest sequence."""
        if self.filled + new > self.k.shape[1]:
            raise ValueError(f"KV cache holds {self.k.shape[1]} tokens; {self.filled + new} requested. "
                             "Allocate a longer cache.")  # fmt: skip

    def advance(self, new: torch.Tensor | int, width: int):
        """After a step of `width` positions, `new` (per sequence, or all) of them were real."""
        self.lengths += new if isinstance(new, int) else new.to(self.lengths.dtype)
        self.filled += width
