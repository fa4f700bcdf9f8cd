"""Decoder-only language model (GPT-style) over any attention backend."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import AttentionConfig, KVCache, ring, sincos_1d
from ..attention.masks import Documents, Padding
from ..attention.norms import make_norm
from ..diagnostics.probes import Probe
from ..errors import ConfigError
from .block import TransformerBlock, drop_path_rates, init_weights


class DecoderLM(nn.Module):
    """tokens (B, T) -> next-token logits (B, T, vocab_size); with `causal=False` a bidirectional
    encoder (masked modelling) whose logits at position t predict token t itself."""

    def __init__(
        self,
        *,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        max_seq_len: int = 2048,
        pos_embed: str = "none",
        tie_embeddings: bool = True,
        norm: str = "pre",
        norm_type: str = "layernorm",
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        attention: AttentionConfig = AttentionConfig(),
        activation_checkpointing: bool = False,
        causal: bool = True,
    ):
        super().__init__()
        if pos_embed not in ("none", "learned", "sincos"):
            raise ConfigError(
                f"model.pos_embed={pos_embed!r}: use none (RoPE / ALiBi in attention), learned or sincos."
            )
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, dim))
        else:
            table = sincos_1d(max_seq_len, dim)[None] if pos_embed == "sincos" else None
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, attention, mlp_ratio, layer_scale, rate, causal=causal, norm=norm,
                             norm_type=norm_type, checkpointing=activation_checkpointing)
            for rate in drop_path_rates(drop_path, depth)
        )  # fmt: skip
        self.norm = make_norm(norm_type, dim, "model.norm_type")
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.logits_probe = Probe("logits")
        self.reset_parameters(depth)

    def reset_parameters(self, depth: int):
        self.apply(init_weights)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        for block in self.blocks:  # residual projections scaled by depth (GPT-2)
            for linear in (block.attn.proj, block.mlp.fc2):
                nn.init.trunc_normal_(linear.weight, std=0.02 / math.sqrt(2 * depth), a=-0.04, b=0.04)

    @property
    def cacheable(self) -> bool:
        """Whether incremental decoding with a KV cache equals recomputing the sequence."""
        return not self.blocks[0].attn.config.bias_depends_on_length

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Per-layer key/value caches for incremental decoding of up to max_len tokens."""
        weight = self.token_embedding.weight
        return [block.attn.new_cache(batch, max_len, weight.device, weight.dtype) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
                lengths: torch.Tensor | None = None, documents: Documents | None = None) -> torch.Tensor:  # fmt: skip
        """`lengths` (B,): right-padded rows (prompts of different lengths); with a `cache`, each
        sequence continues at its own position. `documents`: packed documents attend only within
        themselves (attention positions restart at each; absolute embeddings follow the block)."""
        cp = ring.current()  # context parallel: tokens are this rank's zig-zag share of longer sequences
        if cp is None:
            offset = 0 if cache is None else cache[0].lengths[:, None].long()  # (B, 1)
            positions = offset + torch.arange(tokens.shape[1], device=tokens.device)  # (B|1, T)
            end = tokens.shape[1] if cache is None else cache[0].filled + tokens.shape[1]
        else:
            positions = cp.positions(tokens.shape[1], tokens.device)  # (T,) global positions
            end = tokens.shape[1] * cp.size
        x = self.token_embedding(tokens)  # (B, T, D)
        if self.pos_embed is not None:
            if end > self.max_seq_len:
                raise ValueError(f"{end} tokens exceed model.max_seq_len={self.max_seq_len} (absolute positions).")
            x = x + self.pos_embed[0, positions]
        padding = None if lengths is None else Padding.of(lengths, tokens.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, padding, cache=None if cache is None else cache[i], documents=documents)  # (B, T, D)
        return self.logits_probe(self.head(self.norm(x)))  # (B, T, V)
