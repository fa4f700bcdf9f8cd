"""Where flash_sigmoid mirrors flash-attn's API, flash-attn's semantics decide: windows resolved
as its C++ front end resolves them and masked by the rule of its tests' `construct_local_mask`;
the KV cache's rotary embedding at absolute cache positions (its test rotates with
`seqlen_offsets=cache_seqlens`, left padding included); paged keys for packed sequences;
`return_attn_probs` for varlen. The references here are loops over queries, keys and rotary
pairs in float64, with softmax replaced by sigmoid; nothing comes from the code under test.
test_flash_attn_semantics.py runs the checks on CPU (and under the Triton interpreter), tests/gpu
on CUDA."""

from __future__ import annotations

import math

import torch

from flash_sigmoid import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from .feature_checks import rotate_pairs


def flash_window(window, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's resolution of window_size, step by step as flash_api.cpp does it: a side
    ≥ seqlen_k is −1; causal sets the right side to 0; then a −1 side opposite a bounded one
    becomes seqlen_k."""
    left, right = window
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def local_mask(q_len: int, k_len: int, window: tuple[int, int]) -> torch.Tensor:
    """Allowed (query i, key j) of one sequence, by `construct_local_mask`'s rule: masked when
    j > min(i + k_len − q_len + right, k_len) or j < i + k_len − q_len − left; a window of
    (−1, −1) masks nothing."""
    left, right = window
    allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    if left < 0 and right < 0:
        return allowed
    for i in range(q_len):
        for j in range(k_len):
            if left < 0:
                allowed[i, j] = not j > i + k_len - q_len + right
            else:
                allowed[i, j] = not (j > min(i + k_len - q_len + right, k_len) or j < i + k_len - q_len - left)
    return allowed


def sigmoid_attention(q, k, v, allowed, bias, scale=None):
    """One sequence, q (Tq, H, D), k and v (Tk, Hk, D), allowed (Tq, Tk), bias (H,), in float64:
    (out (Tq, H, D), mass (H, Tq), weights (H, Tq, Tk)). Differentiable."""
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, weights = [], []
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q[:, h].double() @ k[:, g].double().T * scale + float(bias[h])
        p = torch.where(allowed, torch.sigmoid(s), 0.0)
        outs.append(p @ v[:, g].double())
        weights.append(p)
    weights = torch.stack(weights)
    return torch.stack(outs, dim=1), weights.sum(-1), weights


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


WINDOW_CASES = [  # (seqlen_q, seqlen_k, window, causal)
    (10, 3, (1, -1), False),  # one-sided window: the right side becomes seqlen_k
    (10, 3, (-1, 1), False),
    (10, 3, (1, 5), False),  # a side ≥ seqlen_k: unbounded, then seqlen_k
    (10, 3, (4, 1), False),
    (10, 3, (5, 5), False),  # both ≥ seqlen_k: no window at all
    (3, 10, (2, -1), False),
    (12, 4, (1, -1), True),
    (7, 7, (2, 1), False),
]


def check_windows(device, seqlen_q, seqlen_k, window, causal):
    """Padded batch: out, mass and the gradients of q, k, v against the loop reference."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, t, 2, 16, generator=g) for t in (seqlen_q, seqlen_k, seqlen_k))
    leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
    out, mass = flash_attn_func(*leaves, causal=causal, window_size=window, sigmoid_bias=-1.0, return_attn_mass=True)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, dout.to(device))
    allowed = local_mask(seqlen_q, seqlen_k, flash_window(window, causal, seqlen_k))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_mass = [], []
    for b in range(2):
        o, m, _ = sigmoid_attention(*(t[b] for t in ref_leaves), allowed, [-1.0, -1.0])
        ref_out.append(o)
        ref_mass.append(m)
    ref_out = torch.stack(ref_out)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    torch.testing.assert_close(out.cpu().double(), ref_out.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mass.cpu().double(), torch.stack(ref_mass).detach(), atol=2e-5, rtol=2e-5)
    for name, ours, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(ours.cpu().double(), ref, atol=2e-5, rtol=2e-5, msg=f"d{name}")


def _packed(lengths, heads, g):
    return torch.randn(sum(lengths), heads, 16, generator=g)


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def check_varlen_windows_and_probs(device, window, causal):
    """Packed sequences of different lengths (one with seqlen_q > seqlen_k + 1): the window's
    unbounded side resolves against max_seqlen_k, not each sequence's length; S_dmask holds
    each sequence's weights in its top-left corner of [B, H, max_q, max_k], zeros elsewhere."""
    lengths_q, lengths_k = [10, 2, 5], [3, 6, 5]
    g = torch.Generator().manual_seed(6)
    q, k, v = _packed(lengths_q, 4, g), _packed(lengths_k, 2, g), _packed(lengths_k, 2, g)
    max_q, max_k = max(lengths_q), max(lengths_k)
    bias = torch.tensor([-1.0, -2.0, 0.5, -0.5])
    out, mass, probs = flash_attn_varlen_func(*_on(device, q, k, v, _cu(lengths_q, "cpu"), _cu(lengths_k, "cpu")),
                                              max_q, max_k, causal=causal, window_size=window,
                                              sigmoid_bias=bias.to(device), return_attn_probs=True)  # fmt: skip
    assert probs.shape == (3, 4, max_q, max_k)
    resolved = flash_window(window, causal, max_k)
    expected_probs = torch.zeros(3, 4, max_q, max_k, dtype=torch.float64)
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        o, m, p = sigmoid_attention(q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk], local_mask(lq, lk, resolved),
                                    bias)  # fmt: skip
        torch.testing.assert_close(out[q0 : q0 + lq].cpu().double(), o, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(mass[:, q0 : q0 + lq].cpu().double(), m, atol=2e-5, rtol=2e-5)
        expected_probs[b, :, :lq, :lk] = p
        q0, k0 = q0 + lq, k0 + lk
    torch.testing.assert_close(probs.cpu().double(), expected_probs, atol=2e-6, rtol=2e-6)


def _page_table(batch: int, blocks: int, g) -> torch.Tensor:
    """int32 [batch, blocks]: sequence b's j-th page, pages in scrambled order."""
    return torch.randperm(batch * blocks, generator=g).view(batch, blocks).to(torch.int32)


def _paged(rows_per_sequence, table, page: int, g):
    """Each sequence's rows (T_b, Hk, D) laid out token by token in the pages `table` names
    (the rest random): [num_blocks, page, Hk, D]."""
    cache = torch.randn(table.numel(), page, *rows_per_sequence[0].shape[1:], generator=g)
    for b, rows in enumerate(rows_per_sequence):
        for t in range(rows.shape[0]):
            cache[table[b, t // page], t % page] = rows[t]
    return cache


def check_paged_varlen(device, page: int, causal: bool):
    """flash_attn_varlen_func with block_table: packed queries over paged keys (a sequence
    crossing a page boundary, one with seqlen_q > seqlen_k), out, mass and S_dmask."""
    lengths_q, lengths_k = [3, 7, 1], [page + 2, 2, 9]
    capacity = 2 * page
    g = torch.Generator().manual_seed(8)
    q = _packed(lengths_q, 2, g)
    keys = [torch.randn(n, 1, 16, generator=g) for n in lengths_k]
    values = [torch.randn(n, 1, 16, generator=g) for n in lengths_k]
    table = _page_table(len(lengths_k), capacity // page, g)
    k_cache, v_cache = _paged(keys, table, page, g), _paged(values, table, page, g)
    max_q, max_k = max(lengths_q), max(lengths_k)
    with torch.no_grad():
        out, mass, probs = flash_attn_varlen_func(*_on(device, q, k_cache, v_cache, _cu(lengths_q, "cpu"),
                                                       _cu(lengths_k, "cpu")), max_q, max_k, causal=causal,
                                                  block_table=table.to(device), sigmoid_bias=-0.5,
                                                  return_attn_probs=True)  # fmt: skip
    resolved = flash_window((-1, -1), causal, max_k)
    q0 = 0
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        o, m, p = sigmoid_attention(q[q0 : q0 + lq], keys[b], values[b], local_mask(lq, lk, resolved), [-0.5, -0.5])
        torch.testing.assert_close(out[q0 : q0 + lq].cpu().double(), o, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(mass[:, q0 : q0 + lq].cpu().double(), m, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(probs[b, :, :lq, :lk].cpu().double(), p, atol=2e-6, rtol=2e-6)
        q0 += lq
    assert probs.shape == (3, 2, max_q, max_k)


KVCACHE_CASES = [  # (paged, rotary_interleaved or None, causal, window, page)
    (False, False, False, (-1, -1), 16),  # the reproducer: NeoX rotary, non-causal, left padding
    (False, True, True, (-1, -1), 16),
    (True, False, True, (-1, -1), 16),
    (True, True, False, (2, 1), 16),
    (False, None, False, (1, -1), 16),
    (True, False, True, (-1, -1), 24),  # pages of a size that is not a power of two
]


def check_kvcache_semantics(device, paged: bool, interleaved, causal: bool, window, page: int):
    """Three sequences with 5 (3 of them left padding), 2·page − 4 and 0 cached tokens append 2
    new ones; 5 queries each (more than the 2 keys of the last). The new keys are rotated at
    their absolute cache positions cache_seqlens[b] + t, the queries there too when causal or
    windowed, else all at cache_seqlens[b]; out and mass against the loop reference over the
    visible keys (cache_leftpad[b] … cache_seqlens[b] + 1), and the cache holds the rotated keys."""
    batch, heads, kv_heads, d, new, tq = 3, 2, 1, 16, 2, 5
    capacity = 3 * page
    seqlens, leftpad = [5, 2 * page - 4, 0], [3, 0, 0]
    g = torch.Generator().manual_seed(9)
    k_full, v_full = (torch.randn(batch, capacity, kv_heads, d, generator=g) for _ in range(2))
    q, k_new, v_new = (torch.randn(batch, n, h, d, generator=g) for n, h in ((tq, heads), (new, 1), (new, 1)))
    cos = sin = None
    if interleaved is not None:
        angles = torch.arange(capacity)[:, None] * 10000 ** (-torch.arange(d // 2) / (d // 2))  # rotary over all of d
        cos, sin = angles.cos(), angles.sin()
    if paged:
        table = _page_table(batch, capacity // page, g)
        k_cache, v_cache = _paged(list(k_full), table, page, g), _paged(list(v_full), table, page, g)
    else:
        table, k_cache, v_cache = None, k_full.clone(), v_full.clone()
    caches = _on(device, k_cache, v_cache)
    bias = torch.tensor([-1.0, 0.5])
    out, mass = flash_attn_with_kvcache(
        q.to(device), *caches, k_new.to(device), v_new.to(device),
        rotary_cos=None if cos is None else cos.to(device), rotary_sin=None if sin is None else sin.to(device),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device=device),
        block_table=None if table is None else table.to(device), causal=causal, window_size=window,
        rotary_interleaved=bool(interleaved), sigmoid_bias=bias.to(device), return_attn_mass=True,
    )  # fmt: skip
    resolved = flash_window(window, causal, capacity)
    k_after = caches[0].cpu()
    for b in range(batch):
        positions = [seqlens[b] + t for t in range(new)]
        kb, qb = k_new[b].double(), q[b].double()
        if cos is not None:
            kb = rotate_pairs(k_new[b], cos, sin, positions, interleaved)
            q_positions = [seqlens[b] + t for t in range(tq)] if causal or window != (-1, -1) else [seqlens[b]] * tq
            qb = rotate_pairs(q[b], cos, sin, q_positions, interleaved)
        keys = torch.cat([k_full[b, leftpad[b] : seqlens[b]].double(), kb])
        values = torch.cat([v_full[b, leftpad[b] : seqlens[b]], v_new[b]]).double()
        allowed = local_mask(tq, keys.shape[0], resolved)
        o, m, _ = sigmoid_attention(qb, keys, values, allowed, bias)
        torch.testing.assert_close(out[b].cpu().double(), o, atol=2e-5, rtol=2e-5, msg=f"out of sequence {b}")
        torch.testing.assert_close(mass[b].cpu().double(), m, atol=2e-5, rtol=2e-5, msg=f"mass of sequence {b}")
        for t, pos in enumerate(positions):  # the new keys went into the cache at their positions, rotated
            row = k_after[table[b, pos // page], pos % page] if paged else k_after[b, pos]
            torch.testing.assert_close(row.double(), kb[t], atol=1e-5, rtol=1e-5, msg=f"cached key {pos} of {b}")
