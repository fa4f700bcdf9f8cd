"""Every backend against the brute-force reference, module level, over every combination of options.

For each option set, the module on each backend (fp32) must be within FlashAttention's
criterion of the same module whose backend is `tests/brute_force.py` in fp64: error ≤ 2 × (the
brute force in fp32 − in fp64) + a small floor, for the output at real positions and the
gradients of the input, every weight and the learnable bias. The reference recomputes masks,
ALiBi distances and the sigmoid bias (−log n per sequence or per row, plus the learned offset)
itself, so a bug shared by the naive and the fused backends cannot pass.
"""

import itertools

import pytest

from .backend_checks import check_backends

STRUCTURE = list(itertools.product([False, True], [None, 3], [False, True], ["none", "rope", "alibi"], [4, 2]))
SIGMOID_BIAS = list(itertools.product([None, -2.5, "auto"], [None, "per_head"]))


def _id(causal, window, padded, position, kv_heads):
    return f"{'causal' if causal else 'full'}-w{window}-{'padded' if padded else 'dense'}-{position}-kv{kv_heads}"


@pytest.mark.parametrize("causal, window, padded, position, kv_heads", STRUCTURE, ids=[_id(*s) for s in STRUCTURE])
def test_softmax_backends_match_brute_force(causal, window, padded, position, kv_heads):
    check_backends(["softmax", "flash_softmax"], causal, window, padded, position, kv_heads)


@pytest.mark.parametrize(
    "sigmoid_bias, learnable_bias", SIGMOID_BIAS, ids=[f"b{b}-learn{lb}" for b, lb in SIGMOID_BIAS]
)
@pytest.mark.parametrize("causal, window, padded, position, kv_heads", STRUCTURE, ids=[_id(*s) for s in STRUCTURE])
def test_sigmoid_backends_match_brute_force(causal, window, padded, position, kv_heads, sigmoid_bias, learnable_bias):
    check_backends(["sigmoid", "flash_sigmoid"], causal, window, padded, position, kv_heads,
                   sigmoid_bias=sigmoid_bias, learnable_bias=learnable_bias)  # fmt: skip


CROSS = list(itertools.product([(5, 12), (12, 5)], [False, True], [None, 2], ["none", "alibi"]))


@pytest.mark.parametrize(
    "shape, causal, window, position", CROSS, ids=[f"{s[0]}x{s[1]}-c{c}-w{w}-{p}" for s, c, w, p in CROSS]
)
def test_cross_attention_with_unequal_lengths_matches_brute_force(shape, causal, window, position):
    """Tq ≠ Tk and padding on both sides: where bottom-right alignment and per-sequence offsets matter."""
    check_backends(["softmax", "flash_softmax"], causal, window, True, position, 2, cross=shape)
    check_backends(["sigmoid", "flash_sigmoid"], causal, window, True, position, 2, cross=shape, sigmoid_bias="auto",
                   learnable_bias="per_head")  # fmt: skip


@pytest.mark.parametrize("length_norm", ["n", "sqrt_n"])
@pytest.mark.parametrize("temperature", [None, "per_head"])
def test_sigmoid_variants_match_brute_force(length_norm, temperature):
    check_backends(["sigmoid", "flash_sigmoid"], True, None, True, "rope", 2, sigmoid_bias="auto",
                   length_norm=length_norm, temperature=temperature)  # fmt: skip


def test_per_row_bias_matches_brute_force():
    check_backends(["sigmoid"], True, 3, True, "alibi", 2, sigmoid_bias="auto", bias_n="per_row",
                   learnable_bias="scalar")  # fmt: skip


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_output_gates_match_brute_force(gate):
    """The gate is outside the backend: every backend, gradients of W_g included."""
    check_backends(["softmax", "flash_softmax"], True, None, True, "rope", 2, gate=gate)
    check_backends(["sigmoid", "flash_sigmoid"], True, None, True, "rope", 2, sigmoid_bias="auto", gate=gate)


@pytest.mark.parametrize("causal, window, padded, position, kv_heads", STRUCTURE, ids=[_id(*s) for s in STRUCTURE])
def test_softmax_sinks_match_brute_force(causal, window, padded, position, kv_heads):
    """A learned sink logit per head, its gradient included; the off-by-one softmax (a fixed 0)
    on the structures where masks meet the sink's key: causal, windowed, padded."""
    check_backends(["softmax", "flash_softmax"], causal, window, padded, position, kv_heads, sink="learned")
    if causal and padded:
        check_backends(["softmax", "flash_softmax"], causal, window, padded, position, kv_heads, sink="zero")
