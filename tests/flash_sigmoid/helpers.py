"""The FlashAttention accuracy criterion and input factories shared by the flash_sigmoid tests;
the reference is the brute-force one of `tests/brute_force.py`."""

from __future__ import annotations

import math
import os

import torch

from .. import brute_force

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [  # (batch, seq_q, seq_k, heads, kv_heads, head_dim)
    (2, 1, 1, 2, 2, 64),
    (1, 7, 7, 4, 2, 40),  # GQA, non-power-of-two head dim
    (2, 97, 97, 2, 1, 64),  # MQA
    (1, 113, 57, 4, 4, 80),  # more queries than keys
    (1, 33, 257, 2, 2, 128),  # more keys than queries
]


def make_inputs(b, tq, tk, h, hk, d, dtype, seed=0, packed_lengths=None):
    g = torch.Generator().manual_seed(seed)
    if packed_lengths is not None:  # varlen: [total, H, D]
        tq, tk = sum(packed_lengths[0]), sum(packed_lengths[1])
        shapes = [(tq, h, d), (tk, hk, d), (tk, hk, d)]
    else:
        shapes = [(b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def criterion(ours: torch.Tensor, lowp: torch.Tensor, exact: torch.Tensor, what: str, floor: float = 1e-5):
    """FlashAttention's test: error vs the exact reference at most 2× the error of the same
    reference computed in the inputs' precision, plus a floor scaled to the values' size."""
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item()
    base = (lowp.double() - exact).abs().max().item()
    bound = 2 * base + floor * max(1.0, exact.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} > 2 × low-precision error {base:.3e} + floor"


def reference_run(q, k, v, bias, dout, *, upcast, scale=None, **kw):
    """Reference outputs, mass and gradients (q, k, v, bias) for padded inputs: in float64
    (`upcast`), or in the inputs' own precision (the low-precision baseline of the criterion)."""
    dtype = torch.float64 if upcast else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    bias_leaf = torch.as_tensor(bias, dtype=torch.float64 if upcast else torch.float32).detach().requires_grad_()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, mass, _ = brute_force.attention(*leaves, activation="sigmoid", scale=scale, bias=bias_leaf, dtype=dtype, **kw)
    grads = torch.autograd.grad(out, [*leaves, bias_leaf], dout.to(out.dtype))
    return out, mass, grads
