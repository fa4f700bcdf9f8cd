"""The kernels' address arithmetic in int64: batch × stride and token × stride pass 2³¹ elements
in long contexts (e.g. 8 sequences of 64k tokens × 32 heads × 128). Runs under Triton's
interpreter (see test_triton_interpreter.py), which computes int32 with int32 wrap-around as the
GPU does, on the kernels' own offset helper."""

import pytest
import torch

from .helpers import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (test_triton_interpreter.py)")

if INTERPRETED:  # Triton fixes the interpreter mode when kernels are defined
    import triton
    import triton.language as tl

    from flash_sigmoid.triton_kernels import _tile_offsets

    @triton.jit
    def _probe(Out, Ids, sb, st, sh, BLOCK: tl.constexpr):
        b, start, head = tl.load(Ids), tl.load(Ids + 1), tl.load(Ids + 2)  # int32, as program ids are
        offs = tl.arange(0, BLOCK)
        tl.store(Out + offs[:, None] * BLOCK + offs[None, :], _tile_offsets(b, start, offs, head, sb, st, sh, offs))


def test_tile_offsets_do_not_wrap_past_two_to_the_31():
    b, start, head = 2, 3000, 3
    sb, st, sh = 2**30 + 5, 2**20, 64  # each fits int32; the products do not
    out = torch.zeros(16, 16, dtype=torch.int64)
    _probe[(1,)](out, torch.tensor([b, start, head], dtype=torch.int32), sb, st, sh, BLOCK=16)
    expected = [[b * sb + (start + i) * st + head * sh + d for d in range(16)] for i in range(16)]  # Python ints
    assert out.tolist() == expected
    assert max(map(max, expected)) > 2**32  # the case int32 arithmetic would get wrong
