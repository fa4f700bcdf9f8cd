"""The kernels' device helpers, run under Triton's interpreter (see test_triton_interpreter.py):
address arithmetic in int64 (batch × stride and token × stride pass 2³¹ elements in long
contexts, e.g. 8 sequences of 64k tokens × 32 heads × 128; the interpreter wraps int32 as the
GPU does), and the one-MUFU sigmoid, whose arithmetic the interpreter runs as the GPU does."""

import math

import pytest
import torch

from .helpers import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (test_triton_interpreter.py)")

if INTERPRETED:  # Triton fixes the interpreter mode when kernels are defined
    import triton
    import triton.language as tl

    from flash_sigmoid.tiles import sigmoid2, tile_offsets

    @triton.jit
    def _probe(Out, Ids, sb, st, sh, BLOCK: tl.constexpr):
        b, start, head = tl.load(Ids), tl.load(Ids + 1), tl.load(Ids + 2)  # int32, as program ids are
        offs = tl.arange(0, BLOCK)
        tl.store(Out + offs[:, None] * BLOCK + offs[None, :], tile_offsets(b, start, offs, head, sb, st, sh, offs))

    @triton.jit
    def _sigmoid_probe(Out, T, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Out + offs, sigmoid2(tl.load(T + offs, mask=offs < n), True), mask=offs < n)


def test_tile_offsets_do_not_wrap_past_two_to_the_31():
    b, start, head = 2, 3000, 3
    sb, st, sh = 2**30 + 5, 2**20, 64  # each fits int32; the products do not
    out = torch.zeros(16, 16, dtype=torch.int64)
    _probe[(1,)](out, torch.tensor([b, start, head], dtype=torch.int32), sb, st, sh, BLOCK=16)
    expected = [[b * sb + (start + i) * st + head * sh + d for d in range(16)] for i in range(16)]  # Python ints
    assert out.tolist() == expected
    assert max(map(max, expected)) > 2**32  # the case int32 arithmetic would get wrong


def test_fast_sigmoid_relative_error():
    """1 / (1 + 2^t) by ex2 and two Newton steps: relative error below 1e-5 from p ≈ 1 down to
    p ≈ 2^-125 (b = −log n makes p ≈ 1/n: relative, not absolute, accuracy is what counts)."""
    t = torch.cat([torch.linspace(-40, 130, 20000), torch.tensor([-1e4, 0.0, 1e4])]).float()
    out = torch.empty_like(t)
    _sigmoid_probe[(math.ceil(t.numel() / 1024),)](out, t, t.numel(), BLOCK=1024)
    exact = 1 / (1 + 2 ** t.double().clamp(max=125))  # beyond 2^125 the kernel clamps: p < 3e-38 either way
    assert ((out.double() - exact).abs() / exact).max() < 1e-5
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
