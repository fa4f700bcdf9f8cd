"""Pure-PyTorch sigmoid attention: the exact reference and the memory-efficient CPU path.

Both compute, for query i and key j of one sequence (tensors [batch, seq, heads, head_dim]),

    p_ij = sigmoid(scale · q_i·k_j + bias_h − slope_h · |i + Tk − Tq − j|)   (ALiBi term optional)
    out_i = Σ_j p_ij · v_j                                                    over allowed j

where "allowed" is bottom-right aligned as in flash-attn ≥ 2.1: causal keeps j ≤ i + Tk − Tq,
a window (left, right) keeps i + Tk − Tq − left ≤ j ≤ i + Tk − Tq + right (−1: unbounded).
Masked pairs contribute 0 (no renormalisation: sigmoid attention has none).

`reference_attention` materialises the [B, H, Tq, Tk] matrix in fp32 (fp64 stays fp64).
`chunked_forward` / `chunked_backward` walk key blocks of `block` columns and only the query
rows that can see each block, so memory is O(Tq · block) and causal costs about half of full;
the backward recomputes p instead of storing it, and needs no row statistics (dS = p(1−p)dP).
"""

from __future__ import annotations

import torch
from einops import rearrange


def allowed_and_alibi(rows, cols, diag, causal: bool, window: tuple[int, int], slopes, k_len):
    """For query rows × key cols (1-D index tensors): the allowed mask and the ALiBi term
    −slope·|i + diag − j| as (B|1, H, rows, cols), or None without slopes. `diag` (= Tk − Tq)
    and `k_len` are ints, or (B, 1, 1) tensors for padded batches; the mask is then (B, rows, cols)."""
    rel = cols[None, :] - rows[:, None] - diag  # j − (i + Tk − Tq)
    allowed = cols < k_len
    if causal:
        allowed = allowed & (rel <= 0)
    left, right = window
    if left >= 0:
        allowed = allowed & (rel >= -left)
    if right >= 0:
        allowed = allowed & (rel <= right)
    allowed = allowed.expand(rel.shape)
    if slopes is None:
        return allowed, None
    rel4 = (rel if rel.ndim == 3 else rel[None])[:, None]  # (B|1, 1, rows, cols)
    return allowed, -slopes.reshape(-1 if slopes.ndim == 2 else 1, slopes.shape[-1], 1, 1) * rel4.abs().to(slopes.dtype)


def attention_mask(tq, tk, causal=False, window=(-1, -1), alibi_slopes=None, q_lengths=None, k_lengths=None, *,
                   device=None, dtype=torch.float32):  # fmt: skip
    """The allowed mask, shaped to broadcast against (B, H, Tq, Tk) scores, and the ALiBi term
    (B|1, H, Tq, Tk) or None. `q_lengths` / `k_lengths` (B,): right-padded batches, each
    sequence aligned on its own lengths."""
    rows, cols = torch.arange(tq, device=device), torch.arange(tk, device=device)
    k_len = tk if k_lengths is None else k_lengths.view(-1, 1, 1)
    diag = k_len - (tq if q_lengths is None else q_lengths.view(-1, 1, 1))
    slopes = None if alibi_slopes is None else alibi_slopes.to(dtype)
    allowed, alibi = allowed_and_alibi(rows, cols, diag, causal, window, slopes, k_len)
    return (allowed if allowed.ndim == 2 else allowed[:, None]), alibi


def keys_per_row(tq: int, tk: int, causal: bool, window=(-1, -1), q_lengths=None, k_lengths=None, device=None):
    """How many keys each query row attends (B|1, Tq), in closed form (no mask materialised)."""
    rows = torch.arange(tq, device=device)
    k_len = torch.as_tensor(tk if k_lengths is None else k_lengths, device=device).reshape(-1, 1)
    q_len = torch.as_tensor(tq if q_lengths is None else q_lengths, device=device).reshape(-1, 1)
    center = rows + k_len - q_len  # the key aligned with row i (bottom-right)
    left, right = window
    hi = k_len - 1
    if causal:
        hi = torch.minimum(hi, center)
    if right >= 0:
        hi = torch.minimum(hi, center + right)
    lo = (center - left).clamp(min=0) if left >= 0 else torch.zeros_like(center)
    return (hi - lo + 1).clamp(min=0).float()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, T, Hq, D) -> (B, T, Hk, G, D): query heads grouped by the KV head they share."""
    return rearrange(q, "b t (hk g) d -> b t hk g d", hk=num_kv_heads)


def _bias_terms(bias, alibi, hk_g):
    """bias (B, H) and ALiBi (B|1, H, M, N) as (B, Hk, G, M|1, N|1) addends."""
    hk, g = hk_g
    total = bias.view(bias.shape[0], hk, g, 1, 1)
    if alibi is not None:
        total = total + alibi.reshape(alibi.shape[0], hk, g, *alibi.shape[-2:])
    return total


def logit_bias(bias, dtype, device) -> torch.Tensor:
    """A float or a tensor [], [H], [B, H] or per row [B, H, Tq], shaped to add to (B, H, Tq, Tk)."""
    bias = torch.as_tensor(bias, dtype=dtype, device=device)
    if bias.ndim == 1:
        return bias.reshape(1, -1, 1, 1)
    return bias.reshape(*bias.shape, *(1,) * (4 - bias.ndim)) if bias.ndim else bias


def sigmoid_weights(
    q, k, *, scale: float, bias, causal=False, window=(-1, -1), alibi_slopes=None, q_lengths=None, k_lengths=None,
    upcast=True, softcap=0.0,
) -> torch.Tensor:  # fmt: skip
    """The attention matrix p (B, Hq, Tq, Tk), 0 where masked, in fp32 (fp64 kept) or, with
    `upcast=False`, in the inputs' own precision (the accuracy tests' low-precision baseline).
    `q_lengths` / `k_lengths` (B,): right-padded batches, each sequence aligned on its own.
    softcap > 0: the scores x = scale·q·k become softcap·tanh(x / softcap) before the bias and
    ALiBi are added."""
    dtype = _compute_dtype(q) if upcast else q.dtype
    allowed, alibi = attention_mask(q.shape[1], k.shape[1], causal, window, alibi_slopes, q_lengths, k_lengths,
                                    device=q.device, dtype=dtype)  # fmt: skip
    logits = attention_logits(q, k, scale, dtype=dtype, softcap=softcap, bias=bias, alibi=alibi)
    return torch.sigmoid(logits).masked_fill(~allowed, 0.0)


def attention_logits(q, k, scale: float, *, dtype=None, softcap=0.0, bias=None, alibi=None) -> torch.Tensor:
    """The scores before the activation, (B, Hq, Tq, Tk) in `dtype` (default: q's): scale·q·kᵀ,
    each key head serving its group of query heads (GQA), soft-capped to softcap·tanh(x / softcap)
    when softcap > 0, then the bias (a float, [], [H], [B, H] or per row [B, H, Tq]) and the ALiBi
    term (`attention_mask`'s) added. Masking is the caller's: 0 after a sigmoid, −inf before a
    softmax."""
    dtype = dtype or q.dtype
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + logit_bias(bias, dtype, q.device)
    if alibi is not None:
        logits = logits + alibi
    return logits


def weighted_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j p_ij v_j: (B, Hq, Tq, Tk) × (B, Tk, Hk, D) -> (B, Tq, Hq, D) in the weights' dtype."""
    v = v.repeat_interleave(weights.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.to(weights.dtype))


def reference_attention(q, k, v, *, return_weights=False, **kw):
    """Exact sigmoid attention on [B, T, H, D] tensors: (out, mass [B, H, Tq][, weights]).
    Keyword arguments as `sigmoid_weights`."""
    weights = sigmoid_weights(q, k, **kw)
    out, mass = weighted_values(weights, v).to(q.dtype), weights.sum(-1)
    return (out, mass, weights) if return_weights else (out, mass)


def _row_range(j0: int, j1: int, tq: int, diag: int, causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """Query rows that can see some key in [j0, j1): with rel = j − i − diag, rows need
    rel ≤ min(0 if causal, right) for some j ≥ j0 and rel ≥ −left for some j < j1."""
    left, right = window
    upper = [bound for bound, on in ((0, causal), (right, right >= 0)) if on]
    lo = max(0, j0 - diag - min(upper)) if upper else 0
    hi = min(tq, j1 - diag + left) if left >= 0 else tq
    return lo, hi


def _blocks(q, k, bias, alibi_slopes, causal, window, block):
    """Yield (rows slice, cols slice, allowed (M, N), addend) for each key block with work."""
    tq, tk, hk = q.shape[1], k.shape[1], k.shape[2]
    g = q.shape[2] // hk
    dtype = _compute_dtype(q)
    slopes = None if alibi_slopes is None else alibi_slopes.to(dtype)
    bias = bias.to(dtype)
    for j0 in range(0, tk, block):
        j1 = min(tk, j0 + block)
        i0, i1 = _row_range(j0, j1, tq, tk - tq, causal, window)
        if i0 >= i1:
            continue
        rows = torch.arange(i0, i1, device=q.device)
        cols = torch.arange(j0, j1, device=q.device)
        allowed, alibi = allowed_and_alibi(rows, cols, tk - tq, causal, window, slopes, tk)
        addend = _bias_terms(bias, alibi, (hk, g))
        yield slice(i0, i1), slice(j0, j1), allowed, addend


def _probs(qg, kb, scale, allowed, addend, softcap):
    """p (B, Hk, G, M, N) for grouped queries qg (B, M, Hk, G, D) and keys kb (B, N, Hk, D), and
    the softcap's derivative 1 − tanh²(s/cap) (None without softcap). In place on block-sized
    buffers: this path exists to save memory."""
    logits = torch.einsum("bmhgd,bnhd->bhgmn", qg, kb).mul_(scale)
    dcap = None
    if softcap > 0:  # caps the scores; the bias and ALiBi are added after, as flash-attn adds ALiBi
        th = logits.div_(softcap).tanh_()
        dcap = 1 - th * th
        logits = th.mul_(softcap)
    return logits.add_(addend).sigmoid_().masked_fill_(~allowed, 0.0), dcap


def _keep(seed: int, dropout_p: float, j0: int, shape) -> torch.Tensor | None:
    """This path's dropout pattern for the key block starting at column j0: drawn from a
    generator seeded by (seed, j0), so the backward draws the same one."""
    if dropout_p == 0:
        return None
    generator = torch.Generator().manual_seed((seed * 1_000_003 + j0) % 2**63)
    return torch.rand(shape, generator=generator) >= dropout_p


def chunked_forward(q, k, v, *, scale, bias, causal=False, window=(-1, -1), alibi_slopes=None, softcap=0.0,
                    dropout_p=0.0, seed=0, block=256, probs=None):  # fmt: skip
    """Memory-efficient forward on padded [B, T, H, D]; returns (out, mass [B, H, Tq] fp32).
    The mass is taken before dropout. `probs` (B, H, Tq, Tk) fp32, zeros: filled with the
    weights p this path computes, negated where dropout dropped them (flash-attn's S_dmask)."""
    dtype = _compute_dtype(q)
    hk = k.shape[2]
    qg = _group(q.to(dtype), hk)  # (B, Tq, Hk, G, D)
    kc, vc = k.to(dtype), v.to(dtype)
    out = torch.zeros_like(qg)
    mass = q.new_zeros(q.shape[0], hk, q.shape[2] // hk, q.shape[1], dtype=dtype)
    for rs, cs, allowed, addend in _blocks(q, k, bias, alibi_slopes, causal, window, block):
        p, _ = _probs(qg[:, rs], kc[:, cs], scale, allowed, addend, softcap)  # (B, Hk, G, M, N)
        mass[..., rs] += p.sum(-1)
        keep = _keep(seed, dropout_p, cs.start, p.shape)
        if probs is not None:
            signed = p if keep is None else torch.where(keep, p, -p)
            probs[:, :, rs, cs] = rearrange(signed, "b hk g m n -> b (hk g) m n").float()
        if keep is not None:
            p = p.masked_fill_(~keep, 0.0).div_(1 - dropout_p)
        out[:, rs] += torch.einsum("bhgmn,bnhd->bmhgd", p, vc[:, cs])
    out = rearrange(out, "b t hk g d -> b t (hk g) d").to(q.dtype)
    return out, rearrange(mass, "b hk g t -> b (hk g) t").float()


def chunked_backward(dout, q, k, v, *, scale, bias, causal=False, window=(-1, -1), alibi_slopes=None, softcap=0.0,
                     dropout_p=0.0, seed=0, block=256):  # fmt: skip
    """Gradients (dq, dk, dv, dbias [B, H]) by recomputing p (and the dropout pattern) block by block."""
    dtype = _compute_dtype(q)
    hk = k.shape[2]
    qg, dog = _group(q.to(dtype), hk), _group(dout.to(dtype), hk)
    kc, vc = k.to(dtype), v.to(dtype)
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(kc), torch.zeros_like(vc)
    dbias = q.new_zeros(q.shape[0], hk, q.shape[2] // hk, dtype=dtype)
    for rs, cs, allowed, addend in _blocks(q, k, bias, alibi_slopes, causal, window, block):
        p, dcap = _probs(qg[:, rs], kc[:, cs], scale, allowed, addend, softcap)  # (B, Hk, G, M, N)
        dp = torch.einsum("bmhgd,bnhd->bhgmn", dog[:, rs], vc[:, cs])  # dP
        keep = _keep(seed, dropout_p, cs.start, p.shape)
        kept = p if keep is None else p.masked_fill(~keep, 0.0) / (1 - dropout_p)
        if keep is not None:
            dp = dp.masked_fill_(~keep, 0.0).div_(1 - dropout_p)
        dv[:, cs] += torch.einsum("bhgmn,bmhgd->bnhd", kept, dog[:, rs])
        ds = dp.mul_(p.addcmul_(p, p, value=-1))  # dS = p(1 − p)·dP (sigmoid'); masked entries have p = 0
        dbias += ds.sum(dim=(3, 4))
        if dcap is not None:  # the scores' gradient, through the softcap
            ds = ds.mul_(dcap)
        dk[:, cs] += torch.einsum("bhgmn,bmhgd->bnhd", ds, qg[:, rs]) * scale
        dq[:, rs] += torch.einsum("bhgmn,bnhd->bmhgd", ds, kc[:, cs]) * scale
    dq = rearrange(dq, "b t hk g d -> b t (hk g) d")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias.flatten(1).to(bias.dtype)
