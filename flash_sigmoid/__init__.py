"""FlashSigmoid: fused sigmoid attention with FlashAttention-2's API.

    from flash_sigmoid import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True, sigmoid_bias=-math.log(seqlen))   # [B, T, H, D]

computes sigmoid(softmax_scale · q·kᵀ + sigmoid_bias (+ ALiBi)) · v with masked pairs
contributing 0. Arguments follow flash-attn 2 (names and order), plus `sigmoid_bias` (a float,
or a tensor [] / [heads] that may require grad) and `return_attn_mass` (also return the per-row
attention mass Σ_j p_ij, fp32 [batch, heads, seqlen_q], or [heads, total_q] for varlen).
"""

from __future__ import annotations

from .interface import FlashSigmoidFunction, _run

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "FlashSigmoidFunction",
]


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
    deterministic=False, return_attn_probs=False, sigmoid_bias=0.0, return_attn_mass=False,
):  # fmt: skip
    """q: [B, Tq, H, D]; k, v: [B, Tk, Hk, D] (H a multiple of Hk: MQA / GQA). The backward is
    always deterministic (no atomics); `deterministic` is accepted for compatibility."""
    return _run(
        q, k, v, None, None, 0, 0, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs,
        sigmoid_bias=sigmoid_bias, return_attn_mass=return_attn_mass,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
    deterministic=False, return_attn_probs=False, sigmoid_bias=0.0, return_attn_mass=False,
):  # fmt: skip
    """qkv: [B, T, 3, H, D]."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_sigmoid: qkv must be [batch, seqlen, 3, heads, head_dim], got {tuple(qkv.shape)}.")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                           return_attn_probs, sigmoid_bias, return_attn_mass)  # fmt: skip


def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
    deterministic=False, return_attn_probs=False, sigmoid_bias=0.0, return_attn_mass=False,
):  # fmt: skip
    """q: [B, Tq, H, D]; kv: [B, Tk, 2, Hk, D]."""
    if kv.ndim != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_sigmoid: kv must be [batch, seqlen, 2, heads, head_dim], got {tuple(kv.shape)}.")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                           return_attn_probs, sigmoid_bias, return_attn_mass)  # fmt: skip


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
    sigmoid_bias=0.0, return_attn_mass=False,
):  # fmt: skip
    """Packed variable-length batch: q [total_q, H, D], k, v [total_k, Hk, D]; sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1] (int32). No padding is computed."""
    return _run(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, alibi_slopes=alibi_slopes,
        return_attn_probs=return_attn_probs, sigmoid_bias=sigmoid_bias, return_attn_mass=return_attn_mass,
    )  # fmt: skip
