"""Attention backends: functions `(q, k, v, spec) -> out` registered by name.

Tensors are [batch, seq, heads, head_dim] in and out (FlashAttention's layout). A backend
declares which options it honours; `AttentionConfig` refuses the rest at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

import flash_sigmoid
from flash_sigmoid.reference import allowed_and_alibi, sigmoid_weights, weighted_values


@dataclass(frozen=True)
class AttentionSpec:
    """What one call needs beyond q, k, v (built by the `Attention` module)."""

    scale: float
    causal: bool = False
    dropout_p: float = 0.0
    sigmoid_bias: float | torch.Tensor | None = None  # resolved: a number or a tensor, never "auto"


BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    fn: BackendFn
    activation: str  # "softmax" | "sigmoid"
    supports: frozenset[str]  # option names it honours, e.g. {"causal", "dropout"}


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, activation: str, supports: set[str]):
    def decorator(fn: BackendFn) -> BackendFn:
        BACKENDS[name] = Backend(fn, activation, frozenset(supports))
        return fn

    return decorator


def backends_supporting(option: str) -> list[str]:
    return sorted(name for name, b in BACKENDS.items() if option in b.supports)


# ---- naive backends: materialise the [B, H, Tq, Tk] matrix (the diagnostic reference) ------------


def attention_scores(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Scaled logits q·kᵀ·scale with masked positions at −inf: (B, H, Tq, Tk). Masks are
    bottom-right aligned, as flash-attn >= 2.1 and FlashSigmoid (one definition, theirs)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * spec.scale
    tq, tk = scores.shape[-2:]
    rows, cols = torch.arange(tq, device=q.device), torch.arange(tk, device=q.device)
    allowed, _ = allowed_and_alibi(rows, cols, tk - tq, spec.causal, (-1, -1), None, tk)
    return scores.masked_fill(~allowed, float("-inf"))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Attention weights in fp32 for half inputs (as fused kernels accumulate), fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(weights, p) if p else weights


@register_backend("softmax", "softmax", {"causal", "dropout"})
def softmax_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    weights = torch.softmax(_at_least_fp32(attention_scores(q, k, spec)), dim=-1)  # (B, H, Tq, Tk)
    return weighted_values(_dropout(weights, spec.dropout_p), v).to(q.dtype)  # (B, Tq, H, D)


@register_backend("sigmoid", "sigmoid", {"causal", "dropout", "sigmoid_bias"})
def sigmoid_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """sigmoid(q·kᵀ·scale + b)·v with the matrix materialised: FlashSigmoid's exact reference."""
    bias = 0.0 if spec.sigmoid_bias is None else spec.sigmoid_bias
    weights = sigmoid_weights(q, k, scale=spec.scale, bias=bias, causal=spec.causal)  # (B, H, Tq, Tk)
    return weighted_values(_dropout(weights, spec.dropout_p), v).to(q.dtype)  # (B, Tq, H, D)


# ---- fused softmax: flash-attn on CUDA half precision, else PyTorch SDPA --------------------------

try:  # optional extra: pip install 'attention-simulator[flash-attn]'
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_func = None


@register_backend("flash_softmax", "softmax", {"causal", "dropout"})
def flash_softmax_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v, dropout_p=spec.dropout_p, softmax_scale=spec.scale, causal=spec.causal)
    tq, tk = q.shape[1], k.shape[1]
    mask = None
    if spec.causal and tq != tk:  # SDPA's is_causal is top-left aligned; flash-attn's is bottom-right
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    out = F.scaled_dot_product_attention(
        *(rearrange(t, "b t h d -> b h t d") for t in (q, k, v)),
        attn_mask=mask,
        dropout_p=spec.dropout_p,
        is_causal=spec.causal and mask is None,
        scale=spec.scale,
    )
    return rearrange(out, "b h t d -> b t h d")


@register_backend("flash_sigmoid", "sigmoid", {"causal", "sigmoid_bias"})
def flash_sigmoid_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """This repo's fused kernel: Triton on CUDA, the chunked O(T·block)-memory path on CPU."""
    bias = 0.0 if spec.sigmoid_bias is None else spec.sigmoid_bias
    return flash_sigmoid.flash_attn_func(q, k, v, softmax_scale=spec.scale, causal=spec.causal, sigmoid_bias=bias)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
