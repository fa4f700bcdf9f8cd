"""Backends agree with each other and with formulas written out here."""

import math

import pytest
import torch

from attention_simulator.attention import BACKENDS, Attention, AttentionConfig, AttentionSpec
from attention_simulator.errors import ConfigError

from .. import brute_force


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
def test_module_is_the_textbook_computation(backend):
    """Projections, per-head QK LayerNorm, attention, output projection -- written out here with
    the module's weights and the brute-force attention."""
    torch.manual_seed(0)
    sigmoid = "sigmoid" in backend
    attn = Attention(32, 4, AttentionConfig(backend=backend, qk_norm=True, sigmoid_bias=-1.5 if sigmoid else None))
    x = torch.randn(3, 10, 32)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(3, 10, 3, 4, 8).unbind(2)  # (B, T, H, D) each
    q = torch.nn.functional.layer_norm(q, (8,), attn.q_norm.weight, attn.q_norm.bias)
    k = torch.nn.functional.layer_norm(k, (8,), attn.k_norm.weight, attn.k_norm.bias)
    heads, _, _ = brute_force.attention(q, k, v, activation="sigmoid" if sigmoid else "softmax",
                                        bias=-1.5 if sigmoid else 0.0)  # fmt: skip
    expected = heads.reshape(3, 10, 32).float() @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("backend", ["softmax", "sigmoid"])
def test_naive_backends_compute_in_fp32_under_bf16_autocast(backend):
    """The naive backends are the reference and feed the diagnostics: under autocast their
    weights, output and attention mass are the fp32 ones (same q, k, v), not bf16 ones."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)

    class Capture:
        def __call__(self, weights, padding):
            self.weights = weights
            return weights

    results = {}
    for autocast in (False, True):
        probe = Capture()
        spec = AttentionSpec(scale=0.25, causal=True, sigmoid_bias=-2.0 if backend == "sigmoid" else None, probe=probe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = BACKENDS[backend].fn(q, k, v, spec)
        results[autocast] = out, probe.weights, probe.weights.sum(-1)
    for ours, fp32 in zip(results[True], results[False]):
        assert ours.dtype == fp32.dtype == torch.float32
        torch.testing.assert_close(ours, fp32, rtol=1e-6, atol=1e-6)
