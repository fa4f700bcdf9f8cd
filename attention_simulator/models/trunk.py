"""What every model shares: the trunk of transformer blocks, its options, and absolute position
embeddings. A model file keeps only what differs: its front end (patches, tokens, convolutions)
and its head."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..attention.norms import make_norm
from ..errors import ConfigError
from .block import TransformerBlock


class Trunk(nn.ModuleList):
    """`depth` transformer blocks with the same options (`block`: TransformerBlock's -- dim,
    num_heads, attention, ...), run in order: (B, T, dim) -> (B, T, dim). Stochastic depth grows
    linearly over them, from 0 to `drop_path` (timm's schedule). Indexing and iterating give the
    blocks (FSDP shards each; diagnostics number them across the model)."""

    def __init__(self, *, depth: int, drop_path: float = 0.0, **block):
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        super().__init__(TransformerBlock(**block, drop_path=rate) for rate in rates)

    def final_norm(self) -> nn.Module:
        """The norm after the last block (pre- and hybrid-norm need it; post-norm's is harmless)."""
        return make_norm(self[-1].norm_type, self[-1].dim, "model.norm_type")

    def forward(self, x: torch.Tensor, padding=None, cache=None, documents=None, positions=None) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, padding, None if cache is None else cache[i], documents, positions)  # (B, T, dim)
        return x


MODEL_SET = ("causal",)  # block arguments a model decides, not its config


def trunk_options(model_cls):
    """Class decorator: the model takes the trunk's options (Trunk's and TransformerBlock's:
    depth, dim, num_heads, attention, ...) as keyword arguments of its own, collected in
    `**trunk`. They are declared once, there; the model's signature lists them (config
    validation and `help()` read it)."""
    own = inspect.signature(model_cls, eval_str=True).parameters
    listed = [p for p in own.values() if p.kind is not p.VAR_KEYWORD]
    offered = [inspect.signature(cls, eval_str=True).parameters.values() for cls in (Trunk, TransformerBlock)]
    for p in [*offered[0], *offered[1]]:
        if p.kind is not p.VAR_KEYWORD and p.name not in MODEL_SET and p.name not in {q.name for q in listed}:
            listed.append(p.replace(kind=p.KEYWORD_ONLY))
    model_cls.__signature__ = inspect.Signature(listed)
    return model_cls


POS_EMBEDS = ("none", "learned", "sincos")


def add_pos_embed(module: nn.Module, kind: str, length: int, dim: int, sincos: Callable[[], torch.Tensor]):
    """`module.pos_embed` (1, length, dim), added to the tokens: `learned` (a parameter that
    init_weights draws), `sincos` (the fixed table `sincos()`: a buffer, not saved) or `none`
    (None: positions come from attention -- RoPE, ALiBi -- or nowhere)."""
    if kind not in POS_EMBEDS:
        raise ConfigError(f"model.pos_embed={kind!r}: use none (RoPE / ALiBi in attention, or no positions), learned "
                          "or sincos.")  # fmt: skip
    if kind == "learned":
        module.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
    else:
        module.register_buffer("pos_embed", sincos()[None] if kind == "sincos" else None, persistent=False)


def init_weights(module: nn.Module, std: float = 0.02):
    """timm's ViT init: truncated-normal linear/embedding weights and learned position
    embeddings, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.reset_parameters()
    elif isinstance(getattr(module, "pos_embed", None), nn.Parameter):
        nn.init.trunc_normal_(module.pos_embed, std=std, a=-2 * std, b=2 * std)
