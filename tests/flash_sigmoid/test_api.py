"""The API around the kernels: argument checks, packed forms, gradcheck, torch.compile."""

import math

import pytest
import torch

from flash_sigmoid import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flash_sigmoid.reference import _blocks

from .. import brute_force
from .helpers import make_inputs

Q, K, V = (torch.randn(2, 8, 4, 16) for _ in range(3))
CU = torch.tensor([0, 3, 8], dtype=torch.int32)
PACKED = torch.randn(8, 4, 16)


def bad(**kw):
    args = dict(q=Q, k=K, v=V) | kw
    return lambda: flash_attn_func(**args)


def bad_cache(**kw):
    cache = torch.zeros(2, 16, 4, 16)
    args = dict(q=Q[:, :1], k_cache=cache, v_cache=cache.clone(), k=K[:, :2], v=V[:, :2],
                cache_seqlens=torch.tensor([3, 15], dtype=torch.int32)) | kw  # fmt: skip
    return lambda: flash_attn_with_kvcache(**args)


def compiled_dropout():
    return torch.compile(lambda q: flash_attn_func(q, K, V, dropout_p=0.1), backend="eager", fullgraph=True)(Q)


TABLE = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
PAGES = torch.randn(4, 4, 4, 16, requires_grad=True)  # pages of 4 tokens: 8 per sequence


def no_grad(call):
    return torch.no_grad()(call)


def bad_varlen(**kw):
    args = dict(q=PACKED, k=PACKED, v=PACKED, cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=5, max_seqlen_k=5) | kw
    return lambda: flash_attn_varlen_func(**args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (bad(q=Q[0]), ValueError, r"q must be \[batch, seqlen, heads, head_dim\], got shape \(8, 4, 16\)"),
        (bad(k=K.double()), ValueError, "q, k, v must share dtype"),
        (bad(q=Q.int(), k=K.int(), v=V.int()), ValueError, "dtype torch.int32 is not supported"),
        (bad(v=torch.randn(2, 9, 4, 16)), ValueError, "k and v must have the same shape"),
        (bad(k=torch.randn(3, 8, 4, 16), v=torch.randn(3, 8, 4, 16)), ValueError, "different batch sizes"),
        (
            bad(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)),
            ValueError,
            r"multiple of .* key/value heads \(3\)",
        ),
        (
            bad(q=torch.randn(2, 8, 4, 300), k=torch.randn(2, 8, 4, 300), v=torch.randn(2, 8, 4, 300)),
            ValueError,
            "1..256",
        ),
        (bad(window_size=(-2, 3)), ValueError, r"window_size=\(-2, 3\)"),
        (bad(window_size=5), ValueError, "pair of ints"),
        (bad(alibi_slopes=torch.ones(4, dtype=torch.float64)), ValueError, "float32"),
        (bad(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes has shape \(3,\)"),
        (bad(sigmoid_bias=torch.zeros(3)), ValueError, r"shape \[\], \[4\] or \[2, 4\]"),
        (bad(sigmoid_bias=float("nan")), ValueError, "finite"),
        (bad(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
        (bad(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed must be an int"),
        (compiled_dropout, Exception, "under torch.compile needs dropout_seed"),
        (bad(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
        (bad_varlen(block_table=TABLE, k=PAGES, v=PAGES), ValueError, "block_table is forward only"),
        (no_grad(bad_varlen(block_table=TABLE, k=PAGES, v=PAGES, dropout_p=0.1)), ValueError, "paged keys are for"),
        (no_grad(bad_varlen(block_table=TABLE[:, :1], k=PAGES, v=PAGES)), ValueError, "cu_seqlens_k length"),
        (bad_cache(), ValueError, r"cache_seqlens \+ 2 new tokens exceeds its 16 tokens"),
        (bad_cache(cache_seqlens=torch.tensor([3, 4])), ValueError, "cache_seqlens must be an int32 tensor"),
        (bad_cache(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"shape \(2,\)"),
        (
            bad_cache(
                k_cache=torch.zeros(4, 8, 4, 16),
                v_cache=torch.zeros(4, 8, 4, 16),
                block_table=torch.zeros(2, dtype=torch.int32),
            ),
            ValueError,
            r"block_table must be int32 \[batch=2, max_blocks_per_seq\]",
        ),  # fmt: skip
        (
            bad_cache(
                k_cache=torch.zeros(4, 6, 4, 16),
                v_cache=torch.zeros(4, 6, 4, 16),
                block_table=torch.zeros(2, 2, dtype=torch.int32),
            ),
            ValueError,
            r"cache_seqlens \+ 2 new tokens exceeds its 12 tokens",
        ),  # fmt: skip
        (bad_cache(k=None), ValueError, "k and v are given together"),
        (bad_cache(k=K[:, :2, :2]), ValueError, "k and v must be"),
        (bad_varlen(cu_seqlens_q=CU.long()), ValueError, "cu_seqlens_q must be a 1-D int32"),
        (bad_varlen(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "describe 2 and 1 sequences"),
        (
            bad_varlen(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)),
            ValueError,
            "end at most at the 8 packed",
        ),
        (bad_varlen(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "not decrease"),
        (bad_varlen(max_seqlen_q=4), ValueError, "max_seqlen_q=4"),
        (lambda: flash_attn_qkvpacked_func(torch.randn(2, 8, 2, 4, 16)), ValueError, r"qkv must be"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_packed_forms_equal_the_plain_call():
    qkv = torch.randn(2, 9, 3, 4, 32)
    expected = flash_attn_func(*qkv.unbind(2), causal=True)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True), expected)
    torch.testing.assert_close(flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:]), flash_attn_func(*qkv.unbind(2)))


def test_varlen_equals_padded_when_lengths_are_equal():
    q, k, v = make_inputs(3, 10, 10, 4, 2, 32, torch.float32)
    cu = torch.arange(0, 31, 10, dtype=torch.int32)
    packed = flash_attn_varlen_func(*(t.flatten(0, 1) for t in (q, k, v)), cu, cu, 10, 10, causal=True)
    torch.testing.assert_close(packed.view(3, 10, 4, 32), flash_attn_func(q, k, v, causal=True))


def test_default_scale_and_causal_is_bottom_right():
    q, k, v = make_inputs(1, 3, 5, 2, 2, 16, torch.float64)
    out = flash_attn_func(q, k, v, causal=True)
    ref, _, _ = brute_force.attention(q, k, v, activation="sigmoid", scale=0.25, causal=True)
    torch.testing.assert_close(out, ref.to(out.dtype))
    # the last query sees every key; the first sees keys 0..2 (bottom-right alignment)
    k2 = k.detach().clone()
    k2[:, 3:] += 10
    assert torch.equal(flash_attn_func(q, k2, v, causal=True)[:, 0], out[:, 0])


def test_gradcheck_float64_including_the_bias():
    q, k, v = make_inputs(1, 5, 6, 4, 2, 8, torch.float64)
    bias = torch.tensor([-1.0, -0.5, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def f(q, k, v, bias):
        return flash_attn_func(q, k, v, causal=True, window_size=(3, -1), alibi_slopes=slopes, sigmoid_bias=bias)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    scalar = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, b: flash_attn_func(q, k, v, sigmoid_bias=b), (q, scalar))


def test_torch_compile_fullgraph():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(-math.log(12.0)))

        def forward(self, q, k, v):
            out, mass = flash_attn_func(q, k, v, causal=True, sigmoid_bias=self.bias, return_attn_mass=True)
            return out.sum() + mass.mean()

    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True)  # inductor: what users get
    q, k, v = make_inputs(2, 12, 12, 4, 4, 16, torch.float32)
    eager = layer(q, k, v)
    (g_eager,) = torch.autograd.grad(eager, [layer.bias])
    out = compiled(q, k, v)
    (g_compiled,) = torch.autograd.grad(out, [layer.bias])
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("window", [(-1, -1), (64, 0)])
def test_cpu_path_skips_masked_key_blocks(window):
    """Causal work is about half of full; a sliding window's is proportional to the window."""
    q = torch.zeros(1, 1024, 1, 8)

    def work(causal, window):
        total = 0
        for rows, cols, _, _ in _blocks(q, q, torch.zeros(1), None, causal, window, block=64):
            total += (rows.stop - rows.start) * (cols.stop - cols.start)
        return total / 1024**2

    if window == (-1, -1):
        assert work(False, window) == 1.0 and 0.5 <= work(True, window) <= 0.54
    else:
        assert work(True, window) <= 3 * 64 / 1024
