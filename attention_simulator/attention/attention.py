"""The one attention module: projections, optional QK-norm, and a pluggable backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from .backends import BACKENDS, AttentionSpec, backends_supporting, default_scale


@dataclass(frozen=True)
class AttentionConfig:
    """Options of every attention layer in a model (the `attention/` config group).

    backend: softmax | sigmoid | flash_softmax | flash_sigmoid.
    sigmoid_bias: "auto" (−log n, n = number of keys), a float, or null (no bias); sigmoid
        backends only.
    qk_norm: LayerNorm on queries and keys per head (stabilises attention logits).
    qkv_bias: bias in the query/key/value projection.
    attn_drop, proj_drop: dropout on attention weights and on the output projection.
    """

    backend: str = "softmax"
    sigmoid_bias: float | str | None = None
    qk_norm: bool = False
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"attention.backend={self.backend!r} is not a backend; choose one of {sorted(BACKENDS)}.")
        if isinstance(self.sigmoid_bias, str) and self.sigmoid_bias != "auto":
            raise ConfigError(f"attention.sigmoid_bias={self.sigmoid_bias!r}: use 'auto' (−log n), a number, or null.")
        requested = {"sigmoid_bias": self.sigmoid_bias is not None, "dropout": self.attn_drop > 0}
        for option, on in requested.items():
            self.require(option, on)

    def require(self, option: str, on: bool = True):
        """Raise unless the backend honours `option` (when it is switched on)."""
        if on and option not in BACKENDS[self.backend].supports:
            raise ConfigError(
                f"attention.backend={self.backend!r} cannot honour {option}; backends that can: "
                f"{backends_supporting(option)}. Switch the backend or turn the option off."
            )


class Attention(nn.Module):
    """Multi-head self-attention: x (B, T, C) -> (B, T, C)."""

    def __init__(self, dim: int, num_heads: int, config: AttentionConfig = AttentionConfig(), causal: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(
                f"model width {dim} is not divisible by num_heads={num_heads}; pick a head count that divides it."
            )
        config.require("causal", causal)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.config, self.causal = config, causal
        self.backend = BACKENDS[config.backend].fn
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.proj_drop) if config.proj_drop else nn.Identity()

    def sigmoid_bias(self, num_keys: int) -> float | None:
        b = self.config.sigmoid_bias
        return -math.log(num_keys) if b == "auto" else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b t h d", three=3, h=self.num_heads)  # (B, T, H, D)
        q, k = self.q_norm(q), self.k_norm(k)
        spec = AttentionSpec(
            scale=default_scale(self.head_dim),
            causal=self.causal,
            dropout_p=self.config.attn_drop if self.training else 0.0,
            sigmoid_bias=self.sigmoid_bias(k.shape[1]),
        )
        out = self.backend(q, k, v, spec)  # (B, T, H, D)
        return self.proj_drop(self.proj(rearrange(out, "b t h d -> b t (h d)")))  # (B, T, C)
