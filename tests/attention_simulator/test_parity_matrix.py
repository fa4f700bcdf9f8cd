"""Fused backends against naive ones, module level, over every combination of options.

For each option set, the fused module (fp32) must be within FlashAttention's criterion of an
fp64 copy of the naive module: error ≤ 2 × (naive fp32 − fp64) + a small floor, for the output
at real positions and the gradients of the input, every weight and the learnable bias.
"""

import copy
import itertools

import pytest
import torch

from attention_simulator.attention import Attention, AttentionConfig

from ..flash_sigmoid.helpers import criterion

STRUCTURE = list(itertools.product([False, True], [None, 3], [False, True], ["none", "rope", "alibi"], [4, 2]))
SIGMOID_BIAS = list(itertools.product([None, -2.5, "auto"], [None, "per_head"]))


def _id(causal, window, padded, position, kv_heads):
    return f"{'causal' if causal else 'full'}-w{window}-{'padded' if padded else 'dense'}-{position}-kv{kv_heads}"


def run(module, x, lengths):
    """Output at real positions and the gradients of a loss that only sees real positions."""
    x = x.detach().to(next(module.parameters()).dtype).requires_grad_()
    out = module(x, lengths=lengths)
    real = (torch.arange(x.shape[1])[None, :] < lengths[:, None])[..., None] if lengths is not None else 1.0
    loss = (out * real * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return out * real, dict(zip(["x", *(n for n, p in module.named_parameters() if p.requires_grad)], grads))


def check_pair(naive_backend, fused_backend, causal, window, padded, position, kv_heads, **sigmoid):
    kw = dict(num_kv_heads=kv_heads, position=position, window=window, qk_norm="layernorm", **sigmoid)
    torch.manual_seed(0)
    naive = Attention(32, 4, AttentionConfig(backend=naive_backend, **kw), causal=causal)
    with torch.no_grad():  # learnable bias offsets and temperatures start at 0: make them matter
        for p in (naive.bias_offset, naive.log_temperature):
            if p is not None:
                p.normal_(std=0.3)
    fused = Attention(32, 4, AttentionConfig(backend=fused_backend, **kw), causal=causal)
    fused.load_state_dict(naive.state_dict())
    exact = copy.deepcopy(naive).double()
    x = torch.randn(3, 11, 32)
    lengths = torch.tensor([11, 6, 1]) if padded else None
    ours, lowp, ref = run(fused, x, lengths), run(naive, x, lengths), run(exact, x, lengths)
    criterion(ours[0], lowp[0], ref[0], "out")
    for name in ref[1]:
        criterion(ours[1][name], lowp[1][name], ref[1][name], f"grad {name}")


@pytest.mark.parametrize("causal, window, padded, position, kv_heads", STRUCTURE, ids=[_id(*s) for s in STRUCTURE])
def test_flash_softmax_matches_softmax(causal, window, padded, position, kv_heads):
    check_pair("softmax", "flash_softmax", causal, window, padded, position, kv_heads)


@pytest.mark.parametrize(
    "sigmoid_bias, learnable_bias", SIGMOID_BIAS, ids=[f"b{b}-learn{lb}" for b, lb in SIGMOID_BIAS]
)
@pytest.mark.parametrize("causal, window, padded, position, kv_heads", STRUCTURE, ids=[_id(*s) for s in STRUCTURE])
def test_flash_sigmoid_matches_sigmoid(causal, window, padded, position, kv_heads, sigmoid_bias, learnable_bias):
    check_pair("sigmoid", "flash_sigmoid", causal, window, padded, position, kv_heads,
               sigmoid_bias=sigmoid_bias, learnable_bias=learnable_bias)  # fmt: skip


@pytest.mark.parametrize("length_norm", ["n", "sqrt_n"])
@pytest.mark.parametrize("temperature", [None, "per_head"])
def test_sigmoid_variants_match_across_backends(length_norm, temperature):
    check_pair("sigmoid", "flash_sigmoid", True, None, True, "rope", 2, sigmoid_bias="auto",
               length_norm=length_norm, temperature=temperature)  # fmt: skip
