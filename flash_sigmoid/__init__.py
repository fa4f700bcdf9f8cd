"""FlashSigmoid: fused sigmoid attention with FlashAttention-2's API.

    from flash_sigmoid import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True, sigmoid_bias=-math.log(seqlen))   # [B, T, H, D]

computes sigmoid(softmax_scale · q·kᵀ + sigmoid_bias (+ ALiBi)) · v with masked pairs
contributing 0. Arguments follow flash-attn ≥ 2.6 (names and positional order, `softcap` before
`alibi_slopes`), plus keyword-only extras: `sigmoid_bias` (a float, or a tensor [] / [heads] /
[batch, heads] that may require grad), `return_attn_mass` (also return the per-row attention
mass Σ_j p_ij, fp32 [batch, heads, seqlen_q], or [heads, total_q] for varlen) and
`dropout_seed` (the dropout pattern's seed; drawn from torch's CPU generator when None).
`return_attn_probs=True` returns (out, mass, S_dmask) as flash-attn returns (out, lse, S_dmask):
S_dmask is the attention weights the forward computed, fp32 [batch, heads, seqlen_q, seqlen_k]
(varlen: max_seqlen_q × max_seqlen_k, each sequence's in its top-left corner), 0 where masked,
negated where dropout dropped them; flash-attn rounds the two lengths up to multiples of 128.
"""

from __future__ import annotations

from .interface import FlashSigmoidFunction, attention
from .kvcache import flash_attn_with_kvcache, paged_varlen

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "FlashSigmoidFunction",
]


def _unpack(packed, count: int, what: str, varlen: bool):
    dims = "[total_tokens" if varlen else "[batch, seqlen"
    if packed.ndim != (4 if varlen else 5) or packed.shape[-3] != count:
        raise ValueError(f"flash_sigmoid: {what} must be {dims}, {count}, heads, head_dim], got {tuple(packed.shape)}.")
    return packed.unbind(-3)


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, *, sigmoid_bias=0.0, return_attn_mass=False, dropout_seed=None,
):  # fmt: skip
    """q: [B, Tq, H, D]; k, v: [B, Tk, Hk, D] (H a multiple of Hk: MQA / GQA). The backward is
    always deterministic (no atomics); `deterministic` is accepted for compatibility."""
    return attention(
        q, k, v, None, None, 0, 0, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs,
        sigmoid_bias=sigmoid_bias, return_attn_mass=return_attn_mass, dropout_seed=dropout_seed,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, **extras,
):  # fmt: skip
    """qkv: [B, T, 3, H, D]. `extras`: flash_attn_func's keyword-only arguments."""
    q, k, v = _unpack(qkv, 3, "qkv", varlen=False)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, **extras)  # fmt: skip


def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, **extras,
):  # fmt: skip
    """q: [B, Tq, H, D]; kv: [B, Tk, 2, Hk, D]."""
    k, v = _unpack(kv, 2, "kv", varlen=False)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, **extras)  # fmt: skip


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
    block_table=None, *, sigmoid_bias=0.0, return_attn_mass=False, dropout_seed=None,
):  # fmt: skip
    """Packed variable-length batch: q [total_q, H, D], k, v [total_k, Hk, D]; sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1] (int32). No padding is computed. With `block_table` int32
    [B, max_blocks_per_seq], k and v are paged [num_blocks, page_block_size, Hk, D] and sequence
    b's keys are tokens 0 … cu_seqlens_k[b+1] − cu_seqlens_k[b] − 1 of its pages (forward only,
    as flash-attn, whose backward does not read pages)."""
    if block_table is not None:
        return paged_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), block_table,
                            dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                            softcap=softcap, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs,
                            sigmoid_bias=sigmoid_bias, return_attn_mass=return_attn_mass)  # fmt: skip
    return attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs, sigmoid_bias=sigmoid_bias,
        return_attn_mass=return_attn_mass, dropout_seed=dropout_seed,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, **extras,
):  # fmt: skip
    """qkv: [total, 3, H, D], one cu_seqlens for queries and keys."""
    q, k, v = _unpack(qkv, 3, "qkv", varlen=True)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  **extras)  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **extras,
):  # fmt: skip
    """q: [total_q, H, D]; kv: [total_k, 2, Hk, D]."""
    k, v = _unpack(kv, 2, "kv", varlen=True)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **extras)  # fmt: skip
