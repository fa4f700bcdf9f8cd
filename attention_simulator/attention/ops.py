"""Tensor helpers the attention code shares: precision and grouped-query head expansion."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Attention math in fp32 for half inputs (as fused kernels accumulate), fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values (B, T, Hk, D) repeated to `heads` query heads (GQA / MQA): (B, T, heads, D)."""
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)
