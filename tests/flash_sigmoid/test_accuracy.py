"""out, mass, dq, dk, dv and d-bias against the exact reference, by FlashAttention's criterion.

In the main test run these cases exercise the CPU path; `test_triton_interpreter.py` re-runs
this file with TRITON_INTERPRET=1, where the same calls run the Triton kernels on CPU.
"""

import itertools

import pytest
import torch

from flash_sigmoid import flash_attn_func, flash_attn_varlen_func

from .helpers import SHAPES, criterion, make_inputs, reference_run

MODES = {
    "full": {},
    "causal": {"causal": True},
    "window": {"window": (16, 8)},
    "causal_window": {"causal": True, "window": (24, -1)},
    "alibi_causal": {"causal": True, "alibi": "per_head"},
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BIASES = ["float", "scalar_tensor", "per_head_tensor", "per_sequence_tensor"]


def _cases():
    for i, (shape, mode) in enumerate(itertools.product(SHAPES, MODES)):
        dtype, bias = DTYPES[i % 3], BIASES[(i // 3) % 4]
        yield pytest.param(shape, MODES[mode], dtype, bias, id=f"{'x'.join(map(str, shape))}-{mode}-{dtype}-{bias}")
    yield pytest.param((2, 20, 20, 4, 4, 32), {"alibi": "per_batch"}, torch.float32, "float", id="alibi_per_batch")
    yield pytest.param((1, 16, 16, 2, 2, 256), {"causal": True}, torch.float16, "per_head_tensor", id="head_dim_256")


def make_bias(kind, batch, heads):
    if kind == "float":
        return -1.7
    values = {
        "scalar_tensor": torch.tensor(-1.7),
        "per_head_tensor": torch.linspace(-3.0, 0.5, heads),
        "per_sequence_tensor": torch.linspace(-3.0, 0.5, batch * heads).view(batch, heads),
    }[kind]
    return values.requires_grad_()


def make_alibi(kind, batch, heads):
    if kind is None:
        return None
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    return slopes if kind == "per_head" else slopes.repeat(batch, 1) * torch.rand(batch, 1)


def check_all(out, mass, grads, exact, lowp, bias):
    criterion(out, lowp[0], exact[0], "out")
    criterion(mass, lowp[1], exact[1], "mass")
    for name, ours, lo, ex in zip(("dq", "dk", "dv"), grads, lowp[2], exact[2]):
        criterion(ours, lo, ex, name)
    if isinstance(bias, torch.Tensor):
        criterion(grads[3], lowp[2][3], exact[2][3], "dbias")


@pytest.mark.parametrize("shape, mode, dtype, bias_kind", list(_cases()))
def test_matches_reference(shape, mode, dtype, bias_kind):
    b, tq, tk, h, hk, d = shape
    q, k, v = make_inputs(b, tq, tk, h, hk, d, dtype)
    bias = make_bias(bias_kind, b, h)
    alibi = make_alibi(mode.get("alibi"), b, h)
    kw = dict(causal=mode.get("causal", False), window=mode.get("window", (-1, -1)), alibi_slopes=alibi)
    out, mass = flash_attn_func(
        q, k, v, causal=kw["causal"], window_size=kw["window"], alibi_slopes=alibi, sigmoid_bias=bias,
        return_attn_mass=True,
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == q.shape and mass.shape == (b, h, tq) and mass.dtype == torch.float32
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [q, k, v] + ([bias] if isinstance(bias, torch.Tensor) else [])
    grads = torch.autograd.grad(out, leaves, dout)
    bias_value = bias.detach() if isinstance(bias, torch.Tensor) else bias
    exact = reference_run(q, k, v, bias_value, dout, upcast=True, **kw)
    lowp = reference_run(q, k, v, bias_value, dout, upcast=False, **kw)
    check_all(out, mass, grads, exact, lowp, bias)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_varlen_matches_per_sequence_reference(causal, dtype):
    lengths_q, lengths_k = [5, 31, 1, 18], [9, 31, 4, 18]
    h, hk, d = 4, 2, 64
    q, k, v = make_inputs(0, 0, 0, h, hk, d, dtype, packed_lengths=(lengths_q, lengths_k))
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    bias = torch.linspace(-2.0, -1.0, len(lengths_q) * h).view(-1, h).requires_grad_()  # per sequence and head
    out, mass = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal, sigmoid_bias=bias, return_attn_mass=True
    )
    assert mass.shape == (h, sum(lengths_q))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, [q, k, v, bias], dout)
    refs = {"exact": [], "lowp": []}
    for i in range(len(lengths_q)):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        for name, upcast in (("exact", True), ("lowp", False)):
            seq = [t.detach()[s][None] for t, s in ((q, sq), (k, sk), (v, sk))]
            refs[name].append(reference_run(*seq, bias.detach()[i], dout[sq][None], upcast=upcast, causal=causal))

    def joined(parts):
        out_, mass_, grads_ = zip(*parts)
        cat = [torch.cat([g[j][0] for g in grads_]) for j in range(3)]
        return (
            torch.cat([o[0] for o in out_]),
            torch.cat([m[0] for m in mass_], -1),
            [*cat, torch.stack([g[3] for g in grads_])],
        )

    check_all(out, mass, grads, joined(refs["exact"]), joined(refs["lowp"]), bias)
