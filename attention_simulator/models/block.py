"""The transformer block shared by every model: attention + MLP residual branches with pre-,
post- or hybrid-norm, optional LayerScale and stochastic depth (each `nn.Identity` when off)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import Attention, AttentionConfig
from ..attention.masks import Documents, Padding
from ..attention.norms import make_norm
from ..errors import ConfigError
from ..probes import Probe, ResidualProbe, recomputing


class LayerScale(nn.Module):
    """Per-channel learnable gain on a residual branch (Touvron et al. 2021, CaiT).

    Starting it small keeps each branch's contribution -- and so the attention norms the
    sigmoid paper warns about -- small early in training."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def _optional(module_cls, value, *args):
    return module_cls(*args, value) if value else nn.Identity()


NORM_PLACEMENTS = ("pre", "post", "hybrid")


class TransformerBlock(nn.Module):
    """Attention then MLP, each a residual branch x -> rnorm(x + drop_path(ls(post(f(norm(x)))))):

    pre-norm: `norm` only; post-norm (the original Transformer): `rnorm` only; hybrid-norm:
    `norm` and `post` (y = x + postnorm(f(prenorm(x)))). The others are nn.Identity.
    With `activation_checkpointing`, training keeps only the block's input and recomputes the
    rest in backward. (B, T, C) -> (B, T, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig = AttentionConfig(),
        mlp_ratio: float = 4.0,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        causal: bool = False,
        norm: str = "pre",
        norm_type: str = "layernorm",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.dim, self.norm_type, self.checkpointing = dim, norm_type, activation_checkpointing
        if norm not in NORM_PLACEMENTS:
            raise ConfigError(f"model.norm={norm!r}: use one of {list(NORM_PLACEMENTS)}.")

        def norm_if(*placements):
            return make_norm(norm_type if norm in placements else None, dim, "model.norm_type")

        self.norm1, self.post_norm1, self.residual_norm1 = norm_if("pre", "hybrid"), norm_if("hybrid"), norm_if("post")
        self.attn = Attention(dim, num_heads, attention, causal=causal)
        self.ls1, self.drop_path1 = _optional(LayerScale, layer_scale, dim), _optional(DropPath, drop_path)
        self.norm2, self.post_norm2, self.residual_norm2 = norm_if("pre", "hybrid"), norm_if("hybrid"), norm_if("post")
        self.mlp = Mlp(dim, int(dim * mlp_ratio), attention.proj_drop)
        self.ls2, self.drop_path2 = _optional(LayerScale, layer_scale, dim), _optional(DropPath, drop_path)
        self.mlp_probe, self.resid_probe = Probe("mlp_out"), ResidualProbe("resid")

    def forward(self, x: torch.Tensor, padding: Padding | None = None, cache=None, documents: Documents | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # the recomputation in backward runs with the probes off: it is not a new observation
            return checkpoint(self.branches, x, padding, cache, documents, positions, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), recomputing()))  # fmt: skip
        return self.branches(x, padding, cache, documents, positions)

    def branches(self, x: torch.Tensor, padding: Padding | None = None, cache=None, documents: Documents | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        h = self.attn(self.norm1(x), padding=padding, cache=cache, documents=documents, positions=positions)
        x = self.residual_norm1(x + self.drop_path1(self.ls1(self.post_norm1(h))))  # (B, T, C)
        h = self.post_norm2(self.mlp_probe(self.mlp(self.norm2(x)), padding))  # (B, T, C)
        return self.resid_probe(self.residual_norm2(x + self.drop_path2(self.ls2(h))), padding)
