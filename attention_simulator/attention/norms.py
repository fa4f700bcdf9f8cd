"""Normalisation layers by name (block norms and QK-norm)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}  # both normalise over the last dimension


def make_norm(kind: str | None, dim: int, what: str) -> nn.Module:
    """A norm over the last dimension of size `dim`, or nn.Identity for None."""
    if kind is None:
        return nn.Identity()
    if kind not in NORMS:
        raise ConfigError(f"{what}={kind!r}: use one of {sorted(NORMS)} (or null for none).")
    return NORMS[kind](dim)
