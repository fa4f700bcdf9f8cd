"""The one attention module: projections, QK-norm, positions, sigmoid options, a backend."""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import torch
from einops import rearrange
from torch import nn

from flash_sigmoid.reference import keys_per_row

from ..errors import ConfigError
from ..probes import AttentionProbe, Probe
from .backends import BACKENDS, AttentionSpec, Backend
from .config import AttentionConfig
from .kvcache import KVCache
from .masks import Documents, Padding
from .norms import make_norm
from .positions import RotaryEmbedding, alibi_slopes


def _compact(b: torch.Tensor, heads: int) -> torch.Tensor:
    """(B|1, H|1, Tq|1) -> the smallest of [], [H], [B, H], [B, H, Tq] (what backends take)."""
    if b.shape[2] > 1:
        return b.expand(-1, heads, -1)
    b = b[..., 0]  # (B|1, H|1)
    if b.shape[0] > 1:
        return b.expand(-1, heads)
    return b[0, 0] if b.shape[1] == 1 else b[0]


def _learned(kind: str | None, heads: int) -> nn.Parameter | None:
    return None if kind is None else nn.Parameter(torch.zeros(() if kind == "scalar" else (heads,)))


class OutputGate(nn.Module):
    """out (B, T, H, D) × σ(x W_g), x (B, T, C) the layer's input: one gate per head and token
    (headwise) or one per channel (elementwise) -- Qiu et al. 2025's gated attention, applied
    after attention and before the output projection, so every backend has it."""

    def __init__(self, dim: int, heads: int, head_dim: int, kind: str):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, heads if kind == "headwise" else heads * head_dim)

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.proj(x))  # (B, T, H) or (B, T, H·D)
        return out * rearrange(gate, "b t (h e) -> b t h e", h=self.heads).to(out.dtype)


class SequenceParallel(Protocol):
    """How a layer attends when its input is one process's share of longer sequences: set from
    outside (`parallel.context_parallel`, with `ring.ContextParallel`), as FSDP is applied."""

    size: int  # the processes that share each sequence

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """(local_len,) the global positions of this process's tokens."""

    def attend(self, q, k, v, spec: AttentionSpec, backend: Backend) -> torch.Tensor:
        """Attention of the local queries to every process's keys: (B, Tq, H, D)."""


class Attention(nn.Module):
    """Multi-head attention: x (B, Tq, C) [, context (B, Tk, C_kv)] -> (B, Tq, C).

    Self-attention by default; cross-attention (queries from x, keys and values from
    `context`) when built with `kv_dim`. `padding` / `context_padding` (`Padding.of(lengths, T)`,
    made once per batch) mark right-padded batches: keys beyond a sequence's length are never
    attended."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        config: AttentionConfig = AttentionConfig(),
        causal: bool = False,
        kv_dim: int | None = None,
    ):
        super().__init__()
        kv_heads = config.num_kv_heads or num_heads
        if dim % num_heads:
            raise ConfigError(
                f"model width {dim} is not divisible by num_heads={num_heads}; pick a head count that divides it."
            )
        if num_heads % kv_heads:
            raise ConfigError(f"attention.num_kv_heads={kv_heads} must divide num_heads={num_heads}.")
        if kv_dim is not None and config.position == "rope":
            raise ConfigError("attention.position=rope is for self-attention; cross-attention has no shared positions.")
        config.require("causal", causal)
        self.config, self.causal, self.cross = config, causal, kv_dim is not None
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, dim // num_heads
        self.described = BACKENDS[config.backend]
        self.backend = self.described.fn
        q_size, kv_size = num_heads * self.head_dim, kv_heads * self.head_dim
        if self.cross:
            self.q = nn.Linear(dim, q_size, bias=config.qkv_bias)
            self.kv = nn.Linear(kv_dim, 2 * kv_size, bias=config.qkv_bias)
        else:
            self.qkv = nn.Linear(dim, q_size + 2 * kv_size, bias=config.qkv_bias)
        qk_norm = "layernorm" if config.qk_norm is True else (config.qk_norm or None)
        self.q_norm = make_norm(qk_norm, self.head_dim, "attention.qk_norm")
        self.k_norm = make_norm(qk_norm, self.head_dim, "attention.qk_norm")
        rope = config.position == "rope"
        self.rope = RotaryEmbedding(self.head_dim, config.rope_base, config.rope_fraction) if rope else None
        slopes = alibi_slopes(num_heads) if config.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.bias_offset = _learned(config.learnable_bias, num_heads)
        self.log_temperature = _learned(config.temperature, num_heads)
        if config.sink == "learned":  # a logit per head (init 0), in the normaliser only
            self.sink_logit = nn.Parameter(torch.zeros(num_heads))
        else:  # zero: the off-by-one softmax's fixed 0
            self.register_buffer(
                "sink_logit", torch.zeros(num_heads) if config.sink == "zero" else None, persistent=False
            )
        self.gate = None if config.gate == "none" else OutputGate(dim, num_heads, self.head_dim, config.gate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.proj_drop) if config.proj_drop else nn.Identity()
        self.sequence_parallel: SequenceParallel | None = None  # context parallelism, while applied
        self.weights_probe = AttentionProbe("attn", entropy=self.described.activation == "softmax")
        self.values_probe = Probe("attn_v")
        self.out_probe = Probe("attn_out")

    # ---- the sigmoid options -------------------------------------------------------------------

    def keys_per_row(self, tq: int, tk: int, q_lengths, k_lengths, device) -> torch.Tensor:
        """(B|1, Tq): how many keys each query row attends under this layer's masks."""
        return keys_per_row(tq, tk, self.causal, self.window(), q_lengths, k_lengths, device)

    def sigmoid_bias(self, tq: int, tk: int, q_lengths=None, k_lengths=None, device=None):
        """The bias b: None, a float, or a tensor [], [H], [B, H] or (per row) [B, H, Tq]."""
        base, per_row = self.config.sigmoid_bias, self.config.bias_n == "per_row"  # per_row implies auto
        if self.bias_offset is None and not per_row and (base != "auto" or k_lengths is None):
            return None if base is None else (-math.log(tk) if base == "auto" else float(base))
        if per_row:
            n = self.keys_per_row(tq, tk, q_lengths, k_lengths, device)[:, None, :]  # (B|1, 1, Tq)
        elif base == "auto":
            n = torch.as_tensor(tk if k_lengths is None else k_lengths, device=device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        b = -n.float().clamp(min=1).log() if base == "auto" else torch.tensor(float(base or 0.0), device=device)
        b = b.reshape(-1, 1, b.shape[-1] if b.ndim == 3 else 1)  # (B|1, 1, Tq|1)
        if self.bias_offset is not None:
            b = b + self.bias_offset.reshape(1, -1, 1)  # (B|1, H|1, Tq|1)
        return _compact(b, self.num_heads)

    @contextlib.contextmanager
    def using_backend(self, name: str):
        """Run this layer with the registered backend `name` while inside (the Lipschitz estimate
        differentiates through the naive twin of a fused backend)."""
        previous, self.backend = self.backend, BACKENDS[name].fn
        try:
            yield self
        finally:
            self.backend = previous

    def window(self) -> tuple[int, int]:
        w = self.config.window
        return (-1, -1) if w is None else (w, 0 if self.causal else w)

    # ---- forward ---------------------------------------------------------------------------------

    def project(self, x, context):
        """q (B, Tq, H, D), k and v (B, Tk, Hk, D)."""
        if self.cross:
            q = rearrange(self.q(x), "b t (h d) -> b t h d", d=self.head_dim)
            k, v = rearrange(self.kv(context), "b t (two h d) -> two b t h d", two=2, d=self.head_dim)
            return q, k, v
        qkv = self.qkv(x)
        q_size = self.num_heads * self.head_dim
        q = rearrange(qkv[..., :q_size], "b t (h d) -> b t h d", d=self.head_dim)
        k, v = rearrange(qkv[..., q_size:], "b t (two h d) -> two b t h d", two=2, d=self.head_dim)
        return q, k, v

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        if self.config.bias_depends_on_length:
            raise ConfigError(
                "A KV cache cannot reproduce attention.sigmoid_bias=auto with bias_n=max_length: b = −log(sequence "
                "length) changes every cached key's layer output as the sequence grows. Recompute instead "
                "(use_cache=false), or fix the bias: attention.bias_n=per_row or attention.sigmoid_bias=<a number>."
            )
        return KVCache(batch, max_len, self.kv_heads, self.head_dim, device, dtype)

    def forward(self, x, padding: Padding | None = None, context=None, context_padding: Padding | None = None,
                cache: KVCache | None = None, documents: Documents | None = None, positions=None):  # fmt: skip
        """With a `cache`, x holds the next tokens: queries attend to every cached key too (the
        masks are bottom-right aligned, so this equals recomputing the whole prefix). With
        `documents`, each document of a packed block attends only to itself, as its own sequence.
        `positions` (T,): the tokens' places in their sequence for RoPE when they are not 0..T−1
        (one process's share under context parallelism)."""
        if self.cross != (context is not None):
            raise ValueError("this Attention was built for " + ("cross" if self.cross else "self") + "-attention.")
        q, k, v = self.project(x, context)  # (B, Tq, H, D), (B, Tk, Hk, D) x 2
        q, k = self.q_norm(q), self.k_norm(k)
        if documents is not None:  # one padded row per document: (N, L, H, D)
            q, k, v = self.grouped(documents, cache, q, k, v)
        q_padding = padding if documents is None else documents.padding
        k_padding = context_padding if self.cross else q_padding
        if self.rope is not None:  # each sequence continues at its own position
            q, k = self.rotated(q, k, cache, positions)
        if cache is not None:
            k, v, k_padding = self.cached(cache, k, v, q_padding, k_padding)  # (B, filled + Tq, Hk, D) x 2
        if self.log_temperature is not None:
            q = q * self.log_temperature.exp().reshape(-1, 1).to(q.dtype)  # scales every logit of the head
        tk = self.keys_in_sequence(q, k, cache)
        spec = self.spec(q, tk, q_padding, k_padding, cache)
        out = self.attend(q, k, v, spec)  # (B, Tq, H, D)
        if cache is not None:
            cache.advance(q.shape[1] if q_padding is None else q_padding.lengths, q.shape[1])
        if self.config.length_norm is not None:
            out = self.length_normed(out, tk, spec)
        if documents is not None:
            out = documents.ungroup(out, *x.shape[:2])  # (B, Tq, H, D)
        out = self.values_probe(out, padding)  # attention·V: (B, Tq, H, D)
        if self.gate is not None:
            out = self.gate(out, x)
        out = self.out_probe(self.proj(rearrange(out, "b t h d -> b t (h d)")), padding)  # (B, Tq, C)
        return self.proj_drop(out)

    # ---- the steps of forward ----------------------------------------------------------------------

    def grouped(self, documents: Documents, cache, q, k, v):
        """q, k, v (B, T, ·, D) -> one padded row per document (N, L, ·, D)."""
        if self.cross or cache is not None:
            raise ValueError("documents are for self-attention without a KV cache.")
        return documents.group(q), documents.group(k), documents.group(v)

    def rotated(self, q, k, cache: KVCache | None, positions):
        """RoPE at each token's position: after the cached tokens when decoding, at `positions`
        when given, else at a context-parallel shard's global positions."""
        offset = 0 if cache is None else cache.lengths
        if positions is None and self.sequence_parallel is not None:
            positions = self.sequence_parallel.positions(q.shape[1], q.device)
        return self.rope(q, offset, positions), self.rope(k, offset, positions)

    def cached(self, cache: KVCache, k, v, q_padding: Padding | None, k_padding: Padding | None):
        """Keys and values to attend when decoding: the whole cache with the new ones appended
        (and its padding), or, for a backend that writes the cache itself, the new ones as they are."""
        if self.sequence_parallel is not None:
            raise ValueError("decoding with a KV cache is not context-parallel: decode outside the context.")
        if self.described.writes_kv_cache:
            cache.check_room(k.shape[1])
            return k, v, k_padding
        new = k.shape[1] if q_padding is None else q_padding.lengths
        k, v = cache.write(k, v)  # (B, filled + Tq, Hk, D)
        return k, v, Padding.of(cache.lengths + new, k.shape[1])

    def keys_in_sequence(self, q, k, cache: KVCache | None) -> int:
        """The sequence's key count: a fused cache holds filled + Tq; a context-parallel shard
        holds 1 / size of them."""
        if cache is not None and self.described.writes_kv_cache:
            return cache.filled + q.shape[1]
        return k.shape[1] * (1 if self.sequence_parallel is None else self.sequence_parallel.size)

    def spec(self, q, tk: int, q_padding: Padding | None, k_padding: Padding | None, cache) -> AttentionSpec:
        lengths = None if q_padding is None else q_padding.lengths
        k_lengths = None if k_padding is None else k_padding.lengths
        return AttentionSpec(
            scale=1.0 / math.sqrt(self.head_dim),
            causal=self.causal,
            window=self.window(),
            dropout_p=self.config.attn_drop if self.training else 0.0,
            sigmoid_bias=self.sigmoid_bias(q.shape[1], tk, lengths, k_lengths, q.device),
            alibi_slopes=self.alibi_slopes,
            q_padding=q_padding,
            k_padding=k_padding,
            probe=self.weights_probe if self.weights_probe.active else None,
            kv_cache=cache if self.described.writes_kv_cache else None,
            sink=self.sink_logit,
        )

    def attend(self, q, k, v, spec: AttentionSpec) -> torch.Tensor:
        """The backend, or its context-parallel form: (B, Tq, H, D)."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel.attend(q, k, v, spec, self.described)
        if spec.probe is not None:
            spec.probe.record_scores(q, k, spec, self.described.activation)
        return self.backend(q, k, v, spec)

    def length_normed(self, out, tk: int, spec: AttentionSpec) -> torch.Tensor:
        """out × 1/n or × 1/√n, n the keys each row attends."""
        n = self.keys_per_row(out.shape[1], tk, spec.q_lengths, spec.k_lengths, out.device).clamp(min=1)  # (B|1, Tq)
        return out * (n if self.config.length_norm == "n" else n.sqrt()).reciprocal()[..., None, None].to(out.dtype)
