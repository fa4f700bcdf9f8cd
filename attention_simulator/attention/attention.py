"""The one attention module: projections, QK-norm, positions, sigmoid options, a backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from flash_sigmoid.reference import keys_per_row

from ..diagnostics.probes import AttentionProbe, Probe
from ..errors import ConfigError
from . import ring
from .backends import BACKENDS, AttentionSpec, backends_supporting
from .masks import Documents, Padding
from .norms import make_norm
from .positions import RotaryEmbedding, alibi_slopes

CHOICES = {
    "position": ("none", "rope", "alibi"),
    "bias_n": ("max_length", "per_row"),
    "learnable_bias": (None, "scalar", "per_head"),
    "length_norm": (None, "n", "sqrt_n"),
    "temperature": (None, "scalar", "per_head"),
}


@dataclass(frozen=True)
class AttentionConfig:
    """Options of every attention layer in a model (the `attention/` config group).

    backend: softmax | sigmoid | flash_softmax | flash_sigmoid.
    num_kv_heads: key/value heads (a divisor of the model's heads: GQA; 1: MQA); null = all.
    position: none | rope | alibi (absolute embeddings are the model's `pos_embed`).
    rope_base, rope_fraction: RoPE's base and the fraction of each head's dims it rotates.
    window: sliding window: attend keys at most this far away (only behind, if causal).
    sigmoid_bias: auto (−log n), a number, or null; sigmoid backends only.
    bias_n: what n is for auto: max_length (the keys in the sequence, per sequence when padded;
        the paper's choice) or per_row (the keys each query actually attends: i + 1 when causal).
    learnable_bias: null | scalar | per_head: a learned offset added to sigmoid_bias (init 0).
    length_norm: null | n | sqrt_n: sigmoid attention output × 1/n or × 1/√n, n the keys the row attends.
    temperature: null | scalar | per_head: a learned log-scale on the logits (init 0: scale × 1).
    qk_norm: null | layernorm | rmsnorm (true = layernorm): normalise queries and keys per head.
    qkv_bias: bias in the q/k/v projections. attn_drop, proj_drop: dropout on weights / output.
    """

    backend: str = "softmax"
    num_kv_heads: int | None = None
    position: str = "none"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    window: int | None = None
    sigmoid_bias: float | str | None = None
    bias_n: str = "max_length"
    learnable_bias: str | None = None
    length_norm: str | None = None
    temperature: str | None = None
    qk_norm: str | bool | None = None
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"attention.backend={self.backend!r} is not a backend; choose one of {sorted(BACKENDS)}.")
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"attention.{field}={getattr(self, field)!r}: choose one of {list(allowed)}.")
        if isinstance(self.sigmoid_bias, str) and self.sigmoid_bias != "auto":
            raise ConfigError(f"attention.sigmoid_bias={self.sigmoid_bias!r}: use 'auto' (−log n), a number, or null.")
        if self.bias_n == "per_row" and self.sigmoid_bias != "auto":
            raise ConfigError("attention.bias_n=per_row only applies to attention.sigmoid_bias=auto.")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"attention.window={self.window} must be >= 0 (or null for no window).")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise ConfigError(
                f"attention.num_kv_heads={self.num_kv_heads} must be >= 1 (a divisor of the heads), or null for one "
                "key/value head per query head."
            )
        for name in ("attn_drop", "proj_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"attention.{name}={getattr(self, name)} must be in [0, 1).")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"attention.rope_fraction={self.rope_fraction} must be in (0, 1].")
        requested = {
            "sigmoid_bias": self.sigmoid_bias is not None or self.learnable_bias is not None,
            "per_row_bias": self.bias_n == "per_row",
            "length_norm": self.length_norm is not None,
            "window": self.window is not None,
            "alibi": self.position == "alibi",
            "dropout": self.attn_drop > 0,
        }
        for option, on in requested.items():
            self.require(option, on)

    @property
    def bias_depends_on_length(self) -> bool:
        """True when b = −log(keys in the sequence): then every token's output depends on how
        long the whole sequence is, so keys cached from a shorter prefix go stale."""
        return self.sigmoid_bias == "auto" and self.bias_n == "max_length"

    def require(self, option: str, on: bool = True):
        """Raise unless the backend honours `option` (when it is switched on)."""
        if on and option not in BACKENDS[self.backend].supports:
            raise ConfigError(
                f"attention.backend={self.backend!r} cannot honour {option}; backends that can: "
                f"{backends_supporting(option)}. Switch the backend or turn the option off."
            )


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
        self.backend = BACKENDS[config.backend].fn
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
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.proj_drop) if config.proj_drop else nn.Identity()
        self.weights_probe = AttentionProbe("attn", entropy=BACKENDS[config.backend].activation == "softmax")
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
                cache: KVCache | None = None, documents: Documents | None = None):  # fmt: skip
        """With a `cache`, x holds the next tokens: queries attend to every cached key too (the
        masks are bottom-right aligned, so this equals recomputing the whole prefix). With
        `documents`, each document of a packed block attends only to itself, as its own sequence."""
        if self.cross != (context is not None):
            raise ValueError("this Attention was built for " + ("cross" if self.cross else "self") + "-attention.")
        cp = ring.current()  # context parallel: x is this rank's zig-zag share of longer sequences
        if cp is not None:
            ring.check_layer(self.config, cross=self.cross, cache=cache, documents=documents)
        q, k, v = self.project(x, context)  # (B, Tq, H, D), (B, Tk, Hk, D) x 2
        q, k = self.q_norm(q), self.k_norm(k)
        block_padding = padding  # what the output probes mask: positions of the (B, T) batch
        if documents is not None:  # one padded row per document: (N, L, H, D)
            if self.cross or cache is not None:
                raise ValueError("documents are for self-attention without a KV cache.")
            q, k, v = documents.group(q), documents.group(k), documents.group(v)
            padding = documents.padding
        k_padding = context_padding if self.cross else padding
        lengths = None if padding is None else padding.lengths
        k_lengths = None if k_padding is None else k_padding.lengths
        if self.rope is not None:  # each sequence continues at its own position
            offset = 0 if cache is None else cache.lengths
            positions = None if cp is None else cp.positions(q.shape[1], x.device)  # a shard's global positions
            q, k = self.rope(q, offset, positions), self.rope(k, offset, positions)
        new = tq = q.shape[1]
        fused_cache = cache is not None and self.config.backend == "flash_sigmoid"
        if cache is not None:
            new = tq if padding is None else padding.lengths
            if fused_cache:  # flash_attn_with_kvcache writes the new keys and reads the cache in place
                cache.check_room(tq)
            else:
                k, v = cache.write(k, v)  # (B, filled + Tq, Hk, D)
                k_padding = Padding.of(cache.lengths + new, k.shape[1])
                k_lengths = k_padding.lengths
        if self.log_temperature is not None:
            q = q * self.log_temperature.exp().reshape(-1, 1).to(q.dtype)  # scales every logit of the head
        tk = (cache.filled + tq) if fused_cache else k.shape[1] * (1 if cp is None else cp.size)  # keys in the sequence
        spec = AttentionSpec(
            scale=1.0 / math.sqrt(self.head_dim),
            causal=self.causal,
            window=self.window(),
            dropout_p=self.config.attn_drop if self.training else 0.0,
            sigmoid_bias=self.sigmoid_bias(tq, tk, lengths, k_lengths, x.device),
            alibi_slopes=self.alibi_slopes,
            q_padding=padding,
            k_padding=k_padding,
            probe=self.weights_probe if self.weights_probe.active else None,
            kv_cache=cache if fused_cache else None,
        )
        if cp is None:
            if spec.probe is not None:
                spec.probe.record_logits(q, k, spec)
            out = self.backend(q, k, v, spec)  # (B, Tq, H, D)
        else:
            backend = self.config.backend
            out = ring.ring_attention(q, k, v, spec, cp, BACKENDS[backend].activation, ring.KERNELS[backend])
        if cache is not None:
            cache.advance(new, tq)
        if self.config.length_norm is not None:
            n = self.keys_per_row(tq, tk, lengths, k_lengths, x.device).clamp(min=1)  # (B|1, Tq)
            out = out * (n if self.config.length_norm == "n" else n.sqrt()).reciprocal()[..., None, None].to(out.dtype)
        if documents is not None:
            out = documents.ungroup(out, *x.shape[:2])  # (B, Tq, H, D)
        out = self.values_probe(out, block_padding)  # attention·V: (B, Tq, H, D)
        out = self.out_probe(self.proj(rearrange(out, "b t h d -> b t (h d)")), block_padding)  # (B, Tq, C)
        return self.proj_drop(out)
