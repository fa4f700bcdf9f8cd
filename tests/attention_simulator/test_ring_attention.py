"""Ring attention (context parallelism) against the unsharded computation.

One spawn of two gloo processes runs a whole table of cases: each process builds the same
seeded module, runs it on the full sequence (the reference) and on its zig-zag share inside
`parallel.context_parallel`, and reports the largest differences of the output, the input's gradient, the
parameters' gradients (summed over both processes) and the attention mass.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from attention_simulator.attention import Attention, AttentionConfig, AttentionSpec, ring
from attention_simulator.attention.masks import Padding
from attention_simulator.errors import ConfigError
from attention_simulator.models.lm import DecoderLM
from attention_simulator.parallel import context_parallel

from ..helpers import spawn

WORLD = 2
BATCH, LENGTH, DIM, HEADS = 2, 16, 16, 2  # head_dim 8
TOLERANCE = 1e-5


def zigzag_order(length: int, size: int, rank: int) -> list[int]:
    """The global positions rank `rank` holds, written out: chunks rank and 2·size − 1 − rank."""
    chunk = length // (2 * size)
    order = []
    for piece in (rank, 2 * size - 1 - rank):
        for i in range(chunk):
            order.append(piece * chunk + i)
    return order


# ---- the table of cases -----------------------------------------------------------------------------

EXTRAS = {  # options beyond the backend / mask / position grid, so each appears in some case
    "sigmoid-causal-rope": dict(num_kv_heads=1, learnable_bias="per_head"),
    "sigmoid-full-none": dict(sigmoid_bias=-2.0),
    "flash_sigmoid-full-rope": dict(learnable_bias="scalar", temperature="per_head", qk_norm="layernorm"),
    "flash_sigmoid-full-none": dict(sigmoid_bias=None),
    "flash_sigmoid-causal-none": dict(num_kv_heads=1),
    "softmax-causal-alibi": dict(num_kv_heads=1, qk_norm="rmsnorm"),
    "softmax-causal-rope": dict(sink="learned"),
    "softmax-full-none": dict(sink="zero", gate="headwise"),
}


def attention_cases() -> dict[str, tuple[dict, bool]]:
    cases = {}
    for backend, causal, position in itertools.product(
        ["softmax", "sigmoid", "flash_sigmoid"], [True, False], ["none", "rope", "alibi"]
    ):
        if backend == "flash_sigmoid" and position == "alibi":
            continue
        name = f"{backend}-{'causal' if causal else 'full'}-{position}"
        options = dict(backend=backend, position=position, sigmoid_bias="auto" if "sigmoid" in backend else None)
        cases[name] = (options | EXTRAS.get(name, {}), causal)
    return cases


ATTENTION_CASES = attention_cases()
LM_CASES = {  # name: (pos_embed, attention options); absolute embeddings must use global positions
    "lm-learned-sigmoid-rope": ("learned", dict(backend="sigmoid", position="rope", sigmoid_bias="auto")),
    "lm-sincos-softmax-gated-sink": ("sincos", dict(backend="softmax", gate="headwise", sink="learned")),
    "lm-none-flash_sigmoid-gated": ("none", dict(backend="flash_sigmoid", sigmoid_bias="auto", gate="elementwise")),
}


class MassProbe(nn.Module):
    """Stands in for the attention probe: keeps the per-row attention mass (B, H, T) it sees."""

    active = True

    def __init__(self):
        super().__init__()
        self.mass = None

    def forward(self, weights, padding=None):  # naive backends hand over the whole matrix
        self.mass = weights.detach().sum(-1)
        return weights

    def record_mass(self, mass, padding=None):
        self.mass = mass.detach()

    def record_scores(self, q, k, spec, activation):  # the unsharded call's logits and sinks: not compared here
        pass


# ---- what each process runs ----------------------------------------------------------------------------


def _error(sharded: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference, relative to the reference's largest entry when that exceeds 1."""
    return ((sharded - reference).abs().max() / reference.abs().max().clamp(min=1)).item()


def _randomise(module: nn.Module):
    """Learned biases, temperatures and sinks start at 0; move them so that their gradients matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias_offset" in name or "log_temperature" in name or "sink_logit" in name:
                p.normal_(0.0, 0.5)


def _compare(cp, model, full_input, loss_weight, **sharded_kwargs):
    """Run `model` unsharded and sharded (with `sharded_kwargs`); errors of the output and of every gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [full_input] if full_input.is_floating_point() else []
    out = model(full_input)
    grads = torch.autograd.grad((out * loss_weight).sum(), inputs + params)

    local = cp.split(full_input.detach())
    local_inputs = [local.requires_grad_()] if local.is_floating_point() else []
    with context_parallel(model, cp):
        local_out = model(local, **sharded_kwargs)
        local_grads = torch.autograd.grad((local_out * cp.split(loss_weight)).sum(), local_inputs + params)
    errors = {"out": _error(cp.gather(local_out.detach()), out)}
    if inputs:
        errors["grad_input"] = _error(cp.gather(local_grads[0]), grads[0])
    for (name, _), g, local_g in zip(model.named_parameters(), grads[len(inputs) :], local_grads[len(inputs) :]):
        dist.all_reduce(local_g, group=cp.group)  # each process holds the gradient of its share of the tokens
        errors[f"grad_{name}"] = _error(local_g, g)
    return errors


def _attention_case(cp, seed: int, options: dict, causal: bool) -> dict[str, float]:
    torch.manual_seed(seed)
    module = Attention(DIM, HEADS, AttentionConfig(**options), causal=causal)
    _randomise(module)
    module.weights_probe = MassProbe()
    x = torch.randn(BATCH, LENGTH, DIM, requires_grad=True)
    weight = torch.randn(BATCH, LENGTH, DIM)
    errors = _compare(cp, module, x, weight)
    with torch.no_grad():  # the mass the probe got from the last (sharded) and an unsharded forward
        local_mass = module.weights_probe.mass
        module(x)
    errors["mass"] = _error(cp.gather(local_mass, dim=2), module.weights_probe.mass)
    return errors


def _lm_case(cp, seed: int, pos_embed: str, attention: dict) -> dict[str, float]:
    torch.manual_seed(seed)
    model = DecoderLM(vocab_size=32, dim=DIM, depth=2, num_heads=HEADS, max_seq_len=LENGTH, pos_embed=pos_embed,
                      attention=AttentionConfig(**attention))  # fmt: skip
    tokens = torch.randint(0, 32, (BATCH, LENGTH))
    return _compare(cp, model, tokens, torch.randn(BATCH, LENGTH, 32), positions=cp.positions(LENGTH // WORLD))


def _refuses_padding(cp) -> bool:
    q = torch.randn(BATCH, LENGTH // WORLD, HEADS, 8)
    spec = AttentionSpec(scale=0.35, q_padding=Padding.of(torch.tensor([8, 6]), LENGTH // WORLD))
    try:
        ring.ring_attention(q, q, q, spec, cp, "sigmoid", "naive")
    except ValueError:
        return True
    return False


def _worker(rank: int, results_dir: str):
    group = ring.ContextParallel(dist.new_group(list(range(WORLD))), rank, WORLD)  # an explicit group
    default = ring.ContextParallel(None, rank, WORLD)  # the default group
    results = {}
    for seed, (name, (options, causal)) in enumerate(ATTENTION_CASES.items()):
        results[name] = _attention_case(group, seed, options, causal)
    for seed, (name, options) in enumerate(LM_CASES.items()):
        results[name] = _lm_case(default, seed, *options)
    x = torch.arange(BATCH * LENGTH * 3.0).reshape(BATCH, LENGTH, 3)
    results["gather"] = {"inverse_of_split": _error(group.gather(group.split(x)), x)}
    results["refusals"] = {"padding_refused": float(not _refuses_padding(group))}
    torch.save(results, os.path.join(results_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ring_errors(tmp_path_factory) -> dict[str, dict[str, float]]:
    """Every case's errors, the larger of the two processes'."""
    tmp = tmp_path_factory.mktemp("ring")
    spawn(_worker, tmp, str(tmp), world=WORLD)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return {case: {k: max(r[case][k] for r in per_rank) for k in errors} for case, errors in per_rank[0].items()}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [*ATTENTION_CASES, *LM_CASES])
def test_ring_attention_equals_unsharded(ring_errors, case):
    """Output, input gradient, parameter gradients and (for attention modules) the attention mass."""
    errors = ring_errors[case]
    assert "grad_qkv.weight" in errors or "grad_token_embedding.weight" in errors
    bad = {k: e for k, e in errors.items() if not e <= TOLERANCE}
    assert not bad, f"{case}: {bad}"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gather_inverts_split_and_padding_is_refused(ring_errors):
    assert ring_errors["gather"]["inverse_of_split"] == 0.0
    assert ring_errors["refusals"]["padding_refused"] == 0.0


# ---- single-process checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
def test_split_and_positions_follow_the_zigzag_order(size):
    length = 8 * size
    x = torch.arange(length).reshape(1, length, 1).expand(2, length, 3)
    for rank in range(size):
        cp = ring.ContextParallel(None, rank, size)
        order = zigzag_order(length, size, rank)
        assert cp.positions(length // size).tolist() == order
        assert torch.equal(cp.split(x), x[:, order])
        assert torch.equal(cp.split(x.transpose(0, 1), dim=0), x[:, order].transpose(0, 1))
    with pytest.raises(ValueError, match="divisible"):
        ring.ContextParallel(None, 0, size).split(x[:, :-1])


REFUSED = [
    (dict(backend="flash_softmax"), "attention.backend"),
    (dict(window=4), "attention.window"),
    (dict(attn_drop=0.1), "attention.attn_drop"),
    (dict(backend="sigmoid", sigmoid_bias="auto", bias_n="per_row"), "attention.bias_n"),
    (dict(backend="sigmoid", length_norm="n"), "attention.length_norm"),
    (dict(backend="flash_sigmoid", position="alibi"), "attention.position"),
]


@pytest.mark.parametrize("options, key", REFUSED, ids=[key for _, key in REFUSED])
def test_check_supported_refuses(options, key):
    with pytest.raises(ConfigError) as error:
        ring.check_supported(AttentionConfig(**options))
    assert "trainer.context_parallel" in str(error.value) and key in str(error.value)
    if key == "attention.backend":
        assert "use flash_sigmoid or sigmoid or softmax" in str(error.value)


@pytest.mark.parametrize(
    "options",
    [
        dict(backend="sigmoid", position="alibi", sigmoid_bias="auto", learnable_bias="per_head", num_kv_heads=1),
        dict(backend="flash_sigmoid", position="rope", sigmoid_bias=-3.0, learnable_bias="scalar", qk_norm=True),
        dict(backend="softmax", position="rope", temperature="per_head"),
    ],
)
def test_check_supported_accepts(options):
    ring.check_supported(AttentionConfig(**options))


def test_layers_that_cannot_be_sharded_say_so():
    """Cross-attention, KV-cache decoding and padded batches (a ring of one needs no processes)."""
    cp = ring.ContextParallel(None, 0, 1)
    x = torch.randn(2, 8, DIM)
    cross = Attention(DIM, HEADS, kv_dim=DIM)
    causal = Attention(DIM, HEADS, AttentionConfig(backend="sigmoid", sigmoid_bias=-2.0), causal=True)
    with pytest.raises(ValueError, match="cross-attention"), context_parallel(cross, cp):
        pass
    with context_parallel(causal, cp):
        with pytest.raises(ValueError, match="KV cache"):
            causal(x, cache=causal.new_cache(2, 16))
        with pytest.raises(ValueError, match="padding"):
            causal(x, padding=Padding.of(torch.tensor([8, 5]), 8))
    assert causal.sequence_parallel is None  # the context leaves the layer as it was
