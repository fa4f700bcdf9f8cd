"""Softcap, dropout, the KV cache and FlashSigmoid at b = −log n, each checked on a device against
references written here or in `tests/brute_force.py`: test_features.py runs them on CPU (the
chunked PyTorch path, and the Triton kernels when TRITON_INTERPRET=1), tests/gpu on CUDA."""

import math

import torch

from flash_sigmoid import (
    flash_attn_func,
    flash_attn_with_kvcache,
)

from .. import brute_force
from .helpers import criterion, make_inputs, reference_run


def _on(device, *tensors):
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


def check_softcap(device, dtype=torch.bfloat16):
    """Capped scores (|x| up to ~10 with cap 4) with a learnable per-head bias: out, mass, grads."""
    q, k, v = make_inputs(2, 45, 45, 4, 2, 32, dtype, seed=3)
    q = (q.detach() * 3).requires_grad_()
    bias = torch.linspace(-3.0, -1.0, 4, requires_grad=True)
    qd, kd, vd, bd = _on(device, q, k, v, bias)
    out, mass = flash_attn_func(qd, kd, vd, causal=True, softcap=4.0, sigmoid_bias=bd, return_attn_mass=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = [g.cpu() for g in torch.autograd.grad(out, [qd, kd, vd, bd], dout.to(device))]
    kw = dict(causal=True, softcap=4.0)
    exact = reference_run(q, k, v, bias.detach(), dout, upcast=True, **kw)
    lowp = reference_run(q, k, v, bias.detach(), dout, upcast=False, **kw)
    criterion(out.cpu(), lowp[0], exact[0], "out")
    criterion(mass.cpu(), lowp[1], exact[1], "mass")
    for name, ours, lo, ex in zip(("dq", "dk", "dv", "dbias"), grads, lowp[2], exact[2]):
        criterion(ours, lo, ex, name)
    uncapped = flash_attn_func(qd, kd, vd, causal=True, sigmoid_bias=bd)
    assert (uncapped - out).abs().max() > 0.1  # the cap changes the result


def check_dropout(device):
    """The pattern from return_attn_probs reproduces out and every gradient; its keep rate is
    1 − dropout_p; the same seed gives the same pattern, another seed another."""
    p_drop, seed = 0.3, 1234
    q, k, v = make_inputs(2, 40, 50, 2, 1, 16, torch.float32, seed=5)
    qd, kd, vd = _on(device, q, k, v)
    kw = dict(dropout_p=p_drop, causal=True, sigmoid_bias=-1.0, dropout_seed=seed)
    out, mass, s_dmask = flash_attn_func(qd, kd, vd, return_attn_probs=True, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, [qd, kd, vd], dout.to(device))
    keep = ~torch.signbit(s_dmask.cpu())  # dropped entries come back negated
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, ref_mass, p = brute_force.attention(*leaves, activation="sigmoid", bias=-1.0, causal=True)
    dropped = p * keep / (1 - p_drop)
    ref_out = torch.einsum("bhqk,bkhd->bqhd", dropped, leaves[2].repeat_interleave(2, dim=2))
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    torch.testing.assert_close(s_dmask.cpu().abs().double(), p.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.cpu().double(), ref_mass.detach(), atol=1e-4, rtol=1e-4)  # before dropout
    torch.testing.assert_close(out.cpu().double(), ref_out.detach(), atol=1e-4, rtol=1e-4)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    allowed = p.detach() > 0
    rate, n = keep[allowed].double().mean().item(), allowed.sum().item()
    assert abs(rate - (1 - p_drop)) < 4 * math.sqrt(p_drop * (1 - p_drop) / n), (rate, n)
    both = allowed[..., :-1] & allowed[..., 1:]  # neighbours drawn independently agree p² + (1 − p)² of the time
    agree = (keep[..., :-1] == keep[..., 1:])[both].double().mean().item()
    assert abs(agree - (p_drop**2 + (1 - p_drop) ** 2)) < 0.05, agree
    again = flash_attn_func(qd, kd, vd, **kw)
    other = flash_attn_func(qd, kd, vd, **(kw | {"dropout_seed": seed + 1}))
    assert torch.equal(again, out) and not torch.equal(other, out)


def rotate_pairs(x, cos, sin, positions, interleaved):
    """Rotary embedding, pair by pair, in float64: x (T, H, D) at positions (T,)."""
    out = x.double().clone()
    half = cos.shape[1]
    for t, pos in enumerate(positions):
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            c, s = float(cos[pos, i]), float(sin[pos, i])
            out[t, :, a], out[t, :, b] = x[t, :, a] * c - x[t, :, b] * s, x[t, :, a] * s + x[t, :, b] * c
    return out


def check_kvcache(device, paged: bool, num_splits: int, rotary_interleaved=None):
    """Three sequences with 9, 40 and 0 cached tokens (the first left-padded by 2) append 3 new
    tokens and attend causally: equal to attention over the explicitly concatenated keys, and
    the cache holds the new keys at the right places."""
    batch, heads, kv_heads, d, new, cap = 3, 4, 2, 32, 3, 64
    g = torch.Generator().manual_seed(7)
    seqlens, leftpad = torch.tensor([9, 40, 0], dtype=torch.int32), torch.tensor([2, 0, 0], dtype=torch.int32)
    k_full, v_full = (torch.randn(batch, cap, kv_heads, d, generator=g) for _ in range(2))
    q, k_new, v_new = (torch.randn(batch, new, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    cos = sin = None
    if rotary_interleaved is not None:
        angles = torch.arange(cap)[:, None] * 10000 ** (-torch.arange(8) / 8)  # rotary_dim 16 of 32
        cos, sin = angles.cos(), angles.sin()
    page = 16
    if paged:  # pages in scrambled order: sequence b's j-th page is block_table[b, j]
        order = torch.randperm(batch * cap // page, generator=g)
        block_table = order.view(batch, cap // page).to(torch.int32)
        k_cache, v_cache = (torch.empty(batch * cap // page, page, kv_heads, d) for _ in range(2))
        for b in range(batch):
            for j in range(cap // page):
                k_cache[block_table[b, j]] = k_full[b, j * page : (j + 1) * page]
                v_cache[block_table[b, j]] = v_full[b, j * page : (j + 1) * page]
    else:
        block_table, k_cache, v_cache = None, k_full.clone(), v_full.clone()
    args = _on(device, q, k_cache, v_cache, k_new, v_new)
    bias = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    out, mass = flash_attn_with_kvcache(
        *args, rotary_cos=None if cos is None else cos.to(device), rotary_sin=None if sin is None else sin.to(device),
        cache_seqlens=seqlens.to(device), cache_leftpad=leftpad.to(device),
        block_table=None if block_table is None else block_table.to(device), causal=True, num_splits=num_splits,
        rotary_interleaved=bool(rotary_interleaved), sigmoid_bias=bias.to(device), return_attn_mass=True,
    )  # fmt: skip
    k_cache_after = args[1].cpu()
    for b in range(batch):
        start, end = int(leftpad[b]), int(seqlens[b]) + new
        positions = list(range(int(seqlens[b]), end))  # absolute cache positions, as flash-attn
        kb, qb = k_new[b], q[b]
        if cos is not None:
            kb = rotate_pairs(kb, cos, sin, positions, rotary_interleaved)
            qb = rotate_pairs(qb, cos, sin, positions, rotary_interleaved)
        keys = torch.cat([k_full[b, start : int(seqlens[b])].double(), kb.double()])
        values = torch.cat([v_full[b, start : int(seqlens[b])], v_new[b]]).double()
        ref, ref_mass, _ = brute_force.attention(qb[None].double(), keys[None], values[None], activation="sigmoid",
                                                 bias=bias.double(), causal=True)  # fmt: skip
        torch.testing.assert_close(out[b].cpu().double(), ref[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(mass[b].cpu().double(), ref_mass[0], atol=2e-5, rtol=2e-5)
        for t in range(new):  # the new keys were written into the cache, rotated
            pos = int(seqlens[b]) + t
            row = k_cache_after[block_table[b, pos // page], pos % page] if paged else k_cache_after[b, pos]
            torch.testing.assert_close(row.double(), kb[t].double(), atol=1e-5, rtol=1e-5)


def check_sigmoid_at_minus_log_n(device, dtype):
    """p ≈ 1/n with b = −log n, n = 16384 keys: the regime where the sigmoid's absolute error
    decides the output."""
    n = 16384
    q, k, v = make_inputs(1, 4, n, 1, 1, 32, dtype, seed=11)
    bias = -math.log(n)
    out = flash_attn_func(*_on(device, q, k, v), sigmoid_bias=bias)
    exact, _, _ = brute_force.attention(q.detach(), k.detach(), v.detach(), activation="sigmoid", bias=bias)
    low, _, _ = brute_force.attention(q.detach(), k.detach(), v.detach(), activation="sigmoid", bias=bias, dtype=dtype)
    criterion(out.cpu(), low, exact, "out", floor=1e-6)
