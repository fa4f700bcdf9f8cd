"""`flash_attn_with_kvcache`: incremental decoding over a key/value cache, flash-attn's API.

New keys and values are written into the cache in place (rotated first when rotary tables are
given), then the queries attend to each sequence's cached tokens — contiguous rows, or pages
named by `block_table`. Long caches are cut into `num_splits` slices computed in parallel; with
sigmoid attention the slices' outputs simply add (no log-sum-exp merge as softmax needs).
"""

from __future__ import annotations

import math

import torch

from . import reference
from .interface import bias_table, check_cu_seqlens, check_options, fail, kernels, use_triton, window_bounds


def _rotate(x, cos, sin, positions, interleaved: bool):
    """Rotary embedding of the first 2·cos.shape[1] dims of x (B, T, H, D) at positions (B, T)."""
    half = cos.shape[1]
    c, s = cos[positions][:, :, None].to(torch.float32), sin[positions][:, :, None].to(torch.float32)  # (B,T,1,R/2)
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half :]
    if interleaved:  # pairs (0, 1), (2, 3), …
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:  # GPT-NeoX: pairs (i, i + R/2)
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def _check(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    for name, t, ndim in (("q", q, 4), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim:
            fail(f"{name} must be a 4-D tensor [batch, seqlen, heads, head_dim] (k_cache, v_cache paged: "
                  f"[num_blocks, page_block_size, heads, head_dim]).")  # fmt: skip
        if t.dtype != q.dtype or t.device != q.device:
            fail(f"q, k_cache, v_cache must share dtype and device; {name} is {t.dtype} on {t.device}.")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        fail("k_cache and v_cache need unit stride in head_dim (they are written in place, so not copied).")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1] or q.shape[-2] % k_cache.shape[-2]:
        fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be equal, with q's head_dim "
              f"and a number of heads dividing q's {q.shape[-2]}.")  # fmt: skip
    if (k is None) != (v is None):
        fail("k and v are given together, or neither.")
    if k is not None and (k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != k_cache.shape[2:]):
        fail(f"k and v must be [batch={q.shape[0]}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}], "
              f"got {tuple(k.shape)} and {tuple(v.shape)}.")  # fmt: skip
    batch = q.shape[0]
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                    ("cache_leftpad", cache_leftpad)):  # fmt: skip
        if isinstance(t, torch.Tensor) and (t.dtype != torch.int32 or tuple(t.shape) != (batch,) or
                                            t.device != q.device):  # fmt: skip
            fail(f"{name} must be an int32 tensor of shape ({batch},) on {q.device}, got {t.dtype} "
                  f"{tuple(t.shape)} on {t.device}.")  # fmt: skip
    if not (cache_seqlens is None or isinstance(cache_seqlens, (int, torch.Tensor))):
        fail(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}.")
    if block_table is not None:
        if block_table.dtype != torch.int32 or block_table.ndim != 2 or block_table.shape[0] != batch:
            fail(f"block_table must be int32 [batch={batch}, max_blocks_per_seq], got {block_table.dtype} "
                  f"{tuple(block_table.shape)}.")  # fmt: skip
        if cache_batch_idx is not None:
            fail("cache_batch_idx cannot be combined with block_table: the table already maps each sequence.")


def _check_capacity(ends, capacity: int, what: str):
    """Every sequence's keys (`ends`, per sequence) fit `capacity` tokens: on CUDA as a device
    assertion, raised at the next synchronisation instead of stalling each step."""
    bad = (ends > capacity).any()
    message = (f"flash_sigmoid: a KV cache is too short: {what} exceeds its {capacity} tokens; allocate a longer "
               f"cache (or more pages in block_table).")  # fmt: skip
    if ends.is_cuda:
        torch._assert_async(~bad, message)
    elif bad.item():
        raise ValueError(message)


def _append(cache, new, seqlens, batch_idx, block_table):
    """Write new (B, Tn, Hk, D) into cache at token seqlens[b] + t, in place."""
    pos = seqlens[:, None].long() + torch.arange(new.shape[1], device=new.device)  # (B, Tn)
    if block_table is None:
        cache[batch_idx.long()[:, None], pos] = new
    else:
        page_size = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, pos // page_size)
        cache[pages, pos % page_size] = new


def _splits(num_splits: int, q, capacity: int) -> int:
    """flash-attn's `num_splits`: 0 picks enough slices to give every SM work when batch × heads
    × query blocks is small (decoding), and at most one per 256 cached tokens."""
    if num_splits > 0 or not q.is_cuda:
        return max(1, num_splits)
    programs = q.shape[0] * q.shape[2] * math.ceil(q.shape[1] / 64)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(math.ceil(2 * sms / programs), math.ceil(capacity / 256), 64))


def _cpu_attention(q, k_cache, v_cache, bias, alibi, bounds, kv_batch, block_table, scale, causal, window, softcap,
                   cu_q=None, probs=None):  # fmt: skip
    """The chunked PyTorch path, one sequence at a time (CPU tensors: no device to wait for).
    q padded [B, Tq, H, D] -> (out, mass [B, H, Tq]); or packed [total, H, D] with cu_q ->
    (out, mass [H, total]), rows past the last sequence 0. `probs` [B, H, Tq, Tk]: filled with
    each sequence's weights in its top-left corner."""
    rows = None if cu_q is None else [slice(a, b) for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
    queries = [q[b : b + 1] for b in range(q.shape[0])] if rows is None else [q[r][None] for r in rows]
    results = []
    for b, ((start, length), row) in enumerate(zip(bounds.tolist(), kv_batch.tolist())):
        if block_table is None:
            keys, values = k_cache[row, start : start + length], v_cache[row, start : start + length]
        else:
            pos = torch.arange(start, start + length)
            pages, offs = block_table[b].long()[pos // k_cache.shape[1]], pos % k_cache.shape[1]
            keys, values = k_cache[pages, offs], v_cache[pages, offs]
        slopes = alibi[b : b + 1] if alibi is not None and alibi.ndim == 2 else alibi
        corner = None if probs is None else probs[b : b + 1, :, : queries[b].shape[1], :length]
        results.append(reference.chunked_forward(queries[b], keys[None], values[None], scale=scale,
                                                 bias=bias[b : b + 1], causal=causal, window=window,
                                                 alibi_slopes=slopes, softcap=softcap, probs=corner))  # fmt: skip
    if rows is None:
        return torch.cat([o for o, _ in results]), torch.cat([m for _, m in results])
    out, mass = torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for r, (o, m) in zip(rows, results):
        out[r], mass[:, r] = o[0], m[0]
    return out, mass


@torch.no_grad()
def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
    cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, sigmoid_bias=0.0,
    return_attn_mass=False,
):  # fmt: skip
    """Sigmoid attention of q [B, Tq, H, D] over a KV cache, appending k, v [B, Tn, Hk, D] first.

    k_cache, v_cache: [B_cache, T_cache, Hk, D], or paged [num_blocks, page_block_size, Hk, D]
    with block_table int32 [B, max_blocks_per_seq] (any page size). cache_seqlens (int or int32
    [B]): tokens already cached; the new ones go at cache_seqlens[b]…; sequence b attends to
    cache tokens cache_leftpad[b] … cache_seqlens[b] + Tn − 1, bottom-right aligned for causal
    and windows, a window's unbounded side resolved against the cache's capacity. Rotary tables
    (seqlen_ro, rotary_dim / 2) rotate k at its absolute cache positions cache_seqlens[b] + t
    (left padding included) and q there too when causal or windowed, else all of q at the first
    new position — as flash-attn. With return_softmax_lse or return_attn_mass: (out, mass), the
    per-row attention mass [B, H, Tq] in the lse's place. Inference only: no gradient flows
    through.
    """
    _check(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    batch, device = q.shape[0], q.device
    alibi_slopes = check_options(q, 0.0, softcap, alibi_slopes, batch)
    int32 = dict(device=device, dtype=torch.int32)
    seqlens = torch.full((batch,), cache_seqlens or 0, **int32) if not isinstance(cache_seqlens, torch.Tensor) \
        else cache_seqlens  # fmt: skip
    leftpad = torch.zeros(batch, **int32) if cache_leftpad is None else cache_leftpad
    kv_batch = torch.arange(batch, **int32) if cache_batch_idx is None else cache_batch_idx
    new = 0 if k is None else k.shape[1]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    _check_capacity(seqlens + new, capacity, f"cache_seqlens + {new} new tokens")
    window = window_bounds(window_size, causal, capacity)
    if rotary_cos is not None:
        positions = seqlens.long()[:, None]  # absolute cache positions, as flash-attn's kernel
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, positions + torch.arange(new, device=device), rotary_interleaved)
        q_steps = torch.arange(q.shape[1], device=device) if causal or window != (-1, -1) else 0
        q = _rotate(q, rotary_cos, rotary_sin, positions + q_steps, rotary_interleaved)
    if k is not None:
        _append(k_cache, k, seqlens, kv_batch, block_table)
        _append(v_cache, v, seqlens, kv_batch, block_table)
    bounds = torch.stack([leftpad, seqlens + new - leftpad], dim=1).contiguous()  # (first token, length) per row
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    bias = bias_table(sigmoid_bias, q, batch)
    q = q if q.stride(-1) == 1 else q.contiguous()
    options = (scale, causal, window, float(softcap))
    want_mass = return_softmax_lse or return_attn_mass
    if use_triton(q):
        splits = _splits(num_splits, q, capacity)
        out, mass, _ = kernels().forward_kvcache(q, k_cache, v_cache, bias, alibi_slopes, bounds, kv_batch,
                                               block_table, *options, splits, want_mass)  # fmt: skip
    else:
        out, mass = _cpu_attention(q, k_cache, v_cache, bias, alibi_slopes, bounds, kv_batch, block_table, *options)
    return (out, mass) if want_mass else out


def paged_varlen(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, block_table, *, dropout_p, softmax_scale, causal,
                 window_size, softcap, alibi_slopes, return_attn_probs, sigmoid_bias, return_attn_mass):  # fmt: skip
    """`flash_attn_varlen_func` with `block_table`: packed queries q [total_q, H, D] over paged
    keys, sequence b reading tokens 0 … cu_k[b+1] − cu_k[b] − 1 of the pages block_table[b]
    names. Forward only, as in flash-attn (its backward does not read pages)."""
    if not isinstance(q, torch.Tensor) or q.ndim != 3:
        fail(f"q must be [total_tokens, heads, head_dim], got {getattr(q, 'shape', type(q).__name__)}.")
    batch = cu_q.numel() - 1 if isinstance(cu_q, torch.Tensor) else 0
    _check(q.new_empty(batch, 0, *q.shape[1:]), k_cache, v_cache, None, None, None, None, None, block_table)
    capacity = block_table.shape[1] * k_cache.shape[1]
    check_cu_seqlens(cu_q, cu_k, max_q, max_k, q.shape[0], batch * capacity, q.device)
    _check_capacity(cu_k.diff(), capacity, "a sequence's cu_seqlens_k length")
    if dropout_p:
        fail(f"dropout_p={dropout_p} with block_table: paged keys are for inference; use dropout_p=0.")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        fail("block_table is forward only (flash-attn's backward does not read pages either): run it under "
              "torch.no_grad(), or pass contiguous k, v to train.")  # fmt: skip
    alibi_slopes = check_options(q, 0.0, softcap, alibi_slopes, batch)
    window = window_bounds(window_size, causal, max_k)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    lengths = cu_k.diff().to(torch.int32)
    bounds = torch.stack([torch.zeros_like(lengths), lengths], dim=1).contiguous()
    kv_batch = torch.arange(batch, device=q.device, dtype=torch.int32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    bias = bias_table(sigmoid_bias, q, batch)
    q = q if q.stride(-1) == 1 else q.contiguous()
    options = (scale, causal, window, float(softcap))
    want_mass = return_attn_mass or return_attn_probs
    with torch.no_grad():
        if use_triton(q):
            out, mass, probs = kernels().forward_kvcache(q, k_cache, v_cache, bias, alibi_slopes, bounds, kv_batch,
                                                          block_table, *options, 1, want_mass, cu_q, max_q, max_k,
                                                          return_attn_probs)  # fmt: skip
        else:
            probs = q.new_zeros(batch, q.shape[1], max_q, max_k, dtype=torch.float32) if return_attn_probs else None
            out, mass = _cpu_attention(q, k_cache, v_cache, bias, alibi_slopes, bounds, kv_batch, block_table,
                                       *options, cu_q, probs)  # fmt: skip
    if return_attn_probs:
        return out, mass, probs
    return (out, mass) if return_attn_mass else out
