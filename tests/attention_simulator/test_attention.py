"""Backends agree with each other and with formulas written out here."""

import math

import pytest
import torch

from attention_simulator.attention import BACKENDS, Attention, AttentionConfig, AttentionSpec
from attention_simulator.errors import ConfigError


def qkv(b=2, tq=7, tk=7, h=3, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t: torch.randn(b, t, h, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(tq), make(tk), make(tk)


def grads(out, *inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq, tk", [(7, 7), (5, 9)])
def test_flash_softmax_matches_naive_softmax(causal, tq, tk):
    q, k, v = qkv(tq=tq, tk=tk)
    spec = AttentionSpec(scale=0.3, causal=causal)
    naive = BACKENDS["softmax"].fn(q, k, v, spec)
    fused = BACKENDS["flash_softmax"].fn(q, k, v, spec)
    torch.testing.assert_close(fused, naive.to(fused.dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(fused, q, k, v), grads(naive, q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_sigmoid_matches_the_formula(causal):
    q, k, v = qkv(tq=6, tk=6)
    bias = -math.log(6)
    out = BACKENDS["sigmoid"].fn(q, k, v, AttentionSpec(scale=0.25, causal=causal, sigmoid_bias=bias))
    q, k, v = q.detach(), k.detach(), v.detach()
    expected = torch.zeros_like(out)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i in range(q.shape[1]):
                for j in range(k.shape[1]):
                    if causal and j > i:
                        continue
                    w = 1 / (1 + math.exp(-(q[b, i, h] @ k[b, j, h] * 0.25 + bias)))
                    expected[b, i, h] += w * v[b, j, h]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


def test_softmax_rows_sum_to_one_and_sigmoid_rows_do_not():
    q, k, v = qkv()
    ones = torch.ones_like(v)
    soft = BACKENDS["softmax"].fn(q, k, ones, AttentionSpec(scale=0.3))
    sig = BACKENDS["sigmoid"].fn(q, k, ones, AttentionSpec(scale=0.3, sigmoid_bias=0.0))
    torch.testing.assert_close(soft, torch.ones_like(soft))
    assert (sig - 1).abs().max() > 0.5  # sigmoid mass is per key, not normalised


def test_auto_bias_is_minus_log_n():
    attn = Attention(16, 2, AttentionConfig(backend="sigmoid", sigmoid_bias="auto"))
    assert attn.sigmoid_bias(17, 17) == pytest.approx(-math.log(17))
    assert Attention(16, 2, AttentionConfig(backend="sigmoid", sigmoid_bias=-3.0)).sigmoid_bias(17, 17) == -3.0
    per_sequence = attn.sigmoid_bias(17, 17, k_lengths=torch.tensor([17, 4]))
    torch.testing.assert_close(per_sequence, -torch.tensor([[17.0, 17.0], [4.0, 4.0]]).log())


@pytest.mark.parametrize("backend", ["softmax", "sigmoid", "flash_softmax", "flash_sigmoid"])
def test_module_backends_share_weights_and_shapes(backend):
    torch.manual_seed(0)
    attn = Attention(32, 4, AttentionConfig(backend=backend, qk_norm=True))
    x = torch.randn(3, 10, 32)
    assert attn(x).shape == (3, 10, 32)


@pytest.mark.parametrize(
    "naive, fused, bias", [("softmax", "flash_softmax", None), ("sigmoid", "flash_sigmoid", "auto")]
)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_backends_match_naive_in_the_module(naive, fused, bias, causal):
    torch.manual_seed(0)
    a = Attention(32, 4, AttentionConfig(backend=naive, sigmoid_bias=bias, qk_norm=True), causal=causal)
    b = Attention(32, 4, AttentionConfig(backend=fused, sigmoid_bias=bias, qk_norm=True), causal=causal)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 10, 32, requires_grad=True)
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    grads_a = torch.autograd.grad(out_a.square().sum(), [x, *a.parameters()])
    grads_b = torch.autograd.grad(out_b.square().sum(), [x, *b.parameters()])
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


def test_options_a_backend_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match=r"'softmax' cannot honour sigmoid_bias.*\['flash_sigmoid', 'sigmoid'\]"):
        AttentionConfig(backend="softmax", sigmoid_bias="auto")
    with pytest.raises(ConfigError, match="'-1'"):
        AttentionConfig(backend="sigmoid", sigmoid_bias="-1")
    with pytest.raises(ConfigError, match="not divisible by num_heads=3"):
        Attention(32, 3)
