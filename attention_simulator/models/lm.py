"""Decoder-only language model (GPT-style) over any attention backend."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import KVCache, sincos_1d
from ..attention.masks import Documents, Padding
from ..probes import Probe
from .trunk import Trunk, add_pos_embed, init_weights, trunk_options


@trunk_options
class DecoderLM(nn.Module):
    """tokens (B, T) -> next-token logits (B, T, vocab_size); with `causal=False` a bidirectional
    encoder (masked modelling) whose logits at position t predict token t itself."""

    def __init__(self, *, vocab_size: int, max_seq_len: int = 2048, pos_embed: str = "none",
                 tie_embeddings: bool = True, causal: bool = True, **trunk):  # fmt: skip
        super().__init__()
        self.max_seq_len, dim = max_seq_len, trunk["dim"]
        self.token_embedding = nn.Embedding(vocab_size, dim)
        add_pos_embed(self, pos_embed, max_seq_len, dim, lambda: sincos_1d(max_seq_len, dim))
        self.blocks = Trunk(**trunk, causal=causal)
        self.norm = self.blocks.final_norm()
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.logits_probe = Probe("logits")
        self.reset_parameters()

    def reset_parameters(self):
        self.apply(init_weights)
        for block in self.blocks:  # residual projections scaled by depth (GPT-2)
            for linear in (block.attn.proj, block.mlp.fc2):
                nn.init.trunc_normal_(linear.weight, std=0.02 / math.sqrt(2 * len(self.blocks)), a=-0.04, b=0.04)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the absolute position table covers; None: no table, any length."""
        return None if self.pos_embed is None else self.max_seq_len

    @property
    def cacheable(self) -> bool:
        """Whether incremental decoding with a KV cache equals recomputing the sequence."""
        return not self.blocks[0].attn.config.bias_depends_on_length

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Per-layer key/value caches for incremental decoding of up to max_len tokens."""
        weight = self.token_embedding.weight
        return [block.attn.new_cache(batch, max_len, weight.device, weight.dtype) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None, lengths: torch.Tensor | None = None,
                documents: Documents | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`lengths` (B,): right-padded rows (prompts of different lengths); with a `cache`, each
        sequence continues at its own position. `documents`: packed documents attend only within
        themselves (attention positions restart at each; absolute embeddings follow the block).
        `positions` (T,): the tokens' places in their sequences when they are not 0..T−1 after
        the cache -- e.g. one process's share of each sequence under context parallelism."""
        x = self.token_embedding(tokens)  # (B, T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed[0, self.absolute(tokens, cache) if positions is None else positions]
        padding = None if lengths is None else Padding.of(lengths, tokens.shape[1])
        x = self.blocks(x, padding, cache, documents, positions)  # (B, T, D)
        return self.logits_probe(self.head(self.norm(x)))  # (B, T, V)

    def absolute(self, tokens: torch.Tensor, cache: list[KVCache] | None) -> torch.Tensor:
        """(B|1, T): the tokens' positions, each sequence continuing after its cached tokens."""
        end = tokens.shape[1] if cache is None else cache[0].filled + tokens.shape[1]
        if end > self.max_seq_len:  # (a run refuses this at start-up: config.check_positions)
            raise ValueError(f"{end} tokens exceed model.max_seq_len={self.max_seq_len} (absolute positions).")
        offset = 0 if cache is None else cache[0].lengths[:, None].long()  # (B, 1)
        return offset + torch.arange(tokens.shape[1], device=tokens.device)  # (B|1, T)
