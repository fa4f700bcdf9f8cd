"""Position information: rotary embeddings, ALiBi slopes, and fixed sin-cos tables."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), rotate-half form, on [B, T, H, D] tensors.

    The first `fraction` of each head's dimensions is rotated (partial rotary, as GPT-NeoX);
    the rest passes through. Rotating q and k by their positions makes q·k depend only on the
    positions' difference."""

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"attention.rope_fraction={fraction} must be in (0, 1].")
        self.rotated = int(head_dim * fraction) // 2 * 2
        if self.rotated == 0:
            raise ConfigError(f"attention.rope_fraction={fraction} rotates no dimension of a {head_dim}-dim head.")
        exponent = torch.arange(0, self.rotated, 2, dtype=torch.float64) / self.rotated
        self.register_buffer("inv_freq", (1.0 / base**exponent).float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0, positions: torch.Tensor | None = None):
        """x (B, T, H, D) at positions offset .. offset + T − 1 (offset: one for all, or (B,) per
        sequence), or at explicit `positions` (T,) or (B, T) -> rotated x (B, T, H, D)."""
        if positions is None:
            steps = torch.arange(x.shape[1], device=x.device)
            positions = torch.as_tensor(offset, device=x.device).reshape(-1, 1) + steps
        positions = positions.reshape(-1, x.shape[1]).float()  # (B|1, T)
        angles = (positions[..., None] * self.inv_freq)[:, :, None, :]  # (B|1, T, 1, R/2)
        cos, sin = angles.cos(), angles.sin()
        half = self.rotated // 2
        x1, x2, rest = x[..., :half].float(), x[..., half : self.rotated].float(), x[..., self.rotated :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence 2^(−8/n·i); for a head
    count that is not a power of two, the power of two below plus every other slope of the next."""

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    below = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(below) + powers(2 * below)[0::2][: num_heads - below]
    return torch.tensor(slopes, dtype=torch.float32)


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The Transformer's fixed sinusoidal position table: (length, dim)."""
    if dim % 2:
        raise ConfigError(f"sin-cos position embeddings need an even width, got {dim}.")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos table (MAE / big_vision): half the channels per axis: (grid², dim)."""
    if dim % 4:
        raise ConfigError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}.")
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = sincos_1d(grid, dim // 2, temperature)  # (grid, dim/2)
    return torch.cat([table[x.flatten()], table[y.flatten()]], dim=1)
