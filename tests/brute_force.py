"""Attention the dumbest way, as the tests' reference: explicit loops over (query i, key j)
decide which pairs attend and what ALiBi adds, and a loop over (sequence, head) does the rest
with plain matrix products. Nothing here comes from the code under test.

Conventions (flash-attn >= 2.1): within one sequence of q_len queries and k_len keys, query i
sits at key position i + k_len - q_len (bottom-right alignment). Causal: keys j <= that
position. Window (left, right): keys within [position - left, position + right] (-1:
unbounded). ALiBi adds -slope * |i + k_len - q_len - j|. Right-padded batches: each sequence
uses its own lengths; padded queries attend to nothing (their output is 0).
"""

from __future__ import annotations

import functools
import math

import torch


def visible(i: int, j: int, q_len: int, k_len: int, causal: bool, window: tuple[int, int]) -> bool:
    position = i + k_len - q_len
    left, right = window
    if causal and j > position:
        return False
    if left >= 0 and j < position - left:
        return False
    return not (right >= 0 and j > position + right)


@functools.lru_cache(maxsize=4096)
def pair_tables(tq: int, tk: int, q_len: int, k_len: int, causal: bool, window: tuple[int, int]):
    """(allowed (tq, tk) bool, distance |i + k_len - q_len - j| (tq, tk) float64) for one
    sequence of real lengths q_len <= tq, k_len <= tk."""
    allowed = [[i < q_len and j < k_len and visible(i, j, q_len, k_len, causal, window) for j in range(tk)]
               for i in range(tq)]  # fmt: skip
    distance = [[abs(i + k_len - q_len - j) for j in range(tk)] for i in range(tq)]
    return torch.tensor(allowed), torch.tensor(distance, dtype=torch.float64)


def keys_attended(tq: int, tk: int, q_len: int, k_len: int, causal: bool, window=(-1, -1)) -> list[int]:
    """How many keys each query row of one sequence attends, counted."""
    allowed, _ = pair_tables(tq, tk, q_len, k_len, causal, tuple(window))
    return allowed.sum(1).tolist()


def _per_head(value, b: int, h: int, rows: int):
    """A bias given as a float, [], [H], [B, H] or per row [B, H, Tq] -> (Tq, 1) or a scalar."""
    if not isinstance(value, torch.Tensor):
        return value
    picked = {0: lambda: value, 1: lambda: value[h], 2: lambda: value[b, h], 3: lambda: value[b, h, :rows, None]}
    return picked[value.ndim]()


def attention(q, k, v, *, activation: str, scale: float | None = None, bias=0.0, causal=False, window=(-1, -1),
              alibi_slopes=None, q_lengths=None, k_lengths=None, softcap=0.0, sink=None,
              dtype=torch.float64):  # fmt: skip
    """q (B, Tq, H, D), k and v (B, Tk, Hk, D) -> (out (B, Tq, H, D), mass (B, H, Tq), weights
    (B, H, Tq, Tk)), computed in `dtype`. activation: "sigmoid" (p = σ(s + bias), masked 0) or
    "softmax" (over allowed keys; a row with none is 0). softcap > 0: scores x become
    softcap·tanh(x/softcap) before ALiBi and the bias. sink (H,): softmax with exp(sink[h]) added
    to each row's denominator. Differentiable in q, k, v, bias and sink."""
    batch, tq, heads, head_dim = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
    outs, weights = [], []
    for b in range(batch):
        q_len = tq if q_lengths is None else int(q_lengths[b])
        k_len = tk if k_lengths is None else int(k_lengths[b])
        allowed, distance = pair_tables(tq, tk, q_len, k_len, causal, tuple(window))
        for h in range(heads):
            g = h // (heads // kv_heads)  # the key/value head query head h shares
            s = q[b, :, h] @ k[b, :, g].T * scale  # (Tq, Tk)
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if alibi_slopes is not None:
                slope = alibi_slopes[b, h] if alibi_slopes.ndim == 2 else alibi_slopes[h]
                s = s - slope.to(dtype) * distance.to(dtype)
            if activation == "sigmoid":
                p = torch.where(allowed, torch.sigmoid(s + _per_head(bias, b, h, tq)), 0)
            elif sink is not None:
                e = torch.where(allowed, torch.exp(s), 0)
                p = e / (e.sum(1, keepdim=True) + torch.exp(sink[h].to(dtype)))
            else:
                p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
                p = torch.where(allowed.any(1, keepdim=True), p, 0)  # rows with no key: 0, not NaN
            weights.append(p)
            outs.append(p @ v[b, :, g])  # (Tq, D)
    weights = torch.stack(weights).view(batch, heads, tq, tk)
    out = torch.stack(outs).view(batch, heads, tq, head_dim).transpose(1, 2)
    return out, weights.sum(-1), weights
