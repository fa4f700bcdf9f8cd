"""optorch on FSDP2-sharded parameters: two gloo processes, each holding part of every parameter.

Each case trains one float64 model twice in every process: plainly on the whole batch, and with
`fully_shard` on that process's half of the batch. FSDP's reduce-scatter averages the halves'
gradients, which is the whole batch's mean gradient, so the sharded run must follow the plain
one (itself checked against torch.optim in test_torch_parity) to rounding. One spawn per test:
starting the processes is most of the cost.
"""

import copy
import os

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

import optorch
from optorch import schedules

from ..helpers import spawn

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 2
STEPS = 12
CHECK_EVERY = 4
TOL = dict(rtol=1e-10, atol=1e-12)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # dim-0 sizes 7, 3 and 1 split unevenly over two processes; the last leaves one shard empty
    layers = [nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)]
    return nn.Sequential(*layers).double()


def sharded_copy(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 as the trainer applies it: each block, then the root (which takes the rest)."""
    model = copy.deepcopy(model)
    for i in (0, 3):
        fully_shard(model[i], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    ((model(x) - y) ** 2).mean().backward()
    return {k: p.grad for k, p in model.named_parameters()}


LR = schedules.scaled(0.02, schedules.warmup_cosine(STEPS, 3))


def decay_mask(params):
    return {k: p.ndim > 1 for k, p in params.items()}


CASES = {
    "sgd_nesterov_clipped": lambda: optorch.chain(
        optorch.clip_by_global_norm(0.1), optorch.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ),
    "adamw_masked_clipped": lambda: optorch.chain(
        optorch.clip_by_global_norm(0.5),
        optorch.adamw(LR, weight_decay=0.1, weight_decay_mask=decay_mask),
    ),
    "adam_amsgrad": lambda: optorch.adam(0.02, weight_decay=1e-2, amsgrad=True),
    "lamb": lambda: optorch.lamb(0.02, weight_decay=0.01),
    "lion": lambda: optorch.lion(1e-3, weight_decay=0.1, weight_decay_mask=decay_mask),
    "lars_trust_masked": lambda: optorch.lars(0.1, nesterov=True, weight_decay=1e-3, trust_ratio_mask=decay_mask),
    "groups": lambda: optorch.multi_transform(
        {"matrices": optorch.adam(0.01), "vectors": optorch.sgd(0.05, momentum=0.5)},
        lambda params: {k: "matrices" if p.ndim > 1 else "vectors" for k, p in params.items()},
    ),
}


def _leaves(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        return [leaf for t in tree for leaf in _leaves(t)]
    return [tree]


def assert_state_matches(sharded, plain, what):
    """Same tree and values; every buffer sharded like its parameter, every scalar plain."""
    ours, theirs = _leaves(optorch.state_dict(sharded)), _leaves(optorch.state_dict(plain))
    assert len(ours) == len(theirs), what
    for o, t in zip(ours, theirs):
        if t.ndim:
            assert isinstance(o, DTensor) and o.placements == (Shard(0),), what
            o = o.full_tensor()
        else:
            assert type(o) is torch.Tensor, what  # e.g. clip's global_norm, step counts
        torch.testing.assert_close(o, t, **TOL, msg=what)


def assert_norms_match(tensors: dict, plain: dict, what: str):
    """optorch.norms of sharded tensors: plain 0-d tensors equal to the whole tensors' norms."""
    for (name, norm), reference in zip(zip(tensors, optorch.norms(tensors.values())), plain.values()):
        assert type(norm) is torch.Tensor and norm.ndim == 0, f"{what}/{name}"
        torch.testing.assert_close(norm, reference.detach().pow(2).sum().sqrt(), **TOL, msg=f"{what}/{name}")


def _train_case(name, make_opt, rank, mesh):
    plain = make_model()
    sharded = sharded_copy(plain, mesh)
    runs = [(plain, make_opt()), (sharded, make_opt())]
    states = [opt.init(dict(model.named_parameters())) for model, opt in runs]
    for step in range(STEPS):
        x, y = batch(step)
        grads = [gradients(plain, x, y), gradients(sharded, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])]
        check = step % CHECK_EVERY == CHECK_EVERY - 1
        if check:
            assert_norms_match(grads[1], grads[0], f"{name} step {step} grad")
        for i, (model, opt) in enumerate(runs):
            params = dict(model.named_parameters())
            updates, states[i] = opt.update(grads[i], states[i], params)
            optorch.apply_updates(params, updates)
        if check:
            for (k, p), q in zip(sharded.named_parameters(), plain.parameters()):
                torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=1e-10, msg=f"{name} step {step} {k}")
            assert_norms_match(dict(sharded.named_parameters()), dict(plain.named_parameters()), f"{name} param")
            assert_state_matches(states[1], states[0], f"{name} step {step} state")
            ours, theirs = optorch.state_norms(states[1]), optorch.state_norms(states[0])
            assert ours.keys() == theirs.keys()
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], **TOL, msg=f"{name} step {step} {key}")


def _adamw_against_torch(sharded: nn.Module, rank: int):
    """The sharded AdamW run against torch.optim.AdamW on the plain model, decay on matrices only."""
    plain = make_model()
    decayed = [p for p in plain.parameters() if p.ndim > 1]
    others = [p for p in plain.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decayed}, {"params": others, "weight_decay": 0.0}], lr=0.01, weight_decay=0.1)
    ours = optorch.adamw(0.01, weight_decay=0.1, weight_decay_mask=decay_mask)
    params = dict(sharded.named_parameters())
    state = ours.init(params)
    for step in range(STEPS):
        x, y = batch(step)
        gradients(plain, x, y)
        opt.step()
        updates, state = ours.update(gradients(sharded, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]), state, params)
        optorch.apply_updates(params, updates)
    for (k, p), q in zip(params.items(), plain.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), **TOL, msg=f"adamw vs torch.optim {k}")


def _run_cases(rank, tmp_dir):
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, make_opt in CASES.items():
        _train_case(name, make_opt, rank, mesh)
    _adamw_against_torch(sharded_copy(make_model(), mesh), rank)


def test_sharded_training_matches_plain(tmp_path):
    spawn(_run_cases, tmp_path, str(tmp_path))


class Recorder(TorchDispatchMode):
    """Records the collectives issued, and every op that ran on a DTensor (DTensor dispatch is
    where a hidden redistribute, i.e. a gather, would happen; the math belongs on local shards)."""

    def __init__(self):
        super().__init__()
        self.collectives, self.dtensor_ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.collectives.append(str(func))
        if any(issubclass(t, DTensor) for t in types):
            self.dtensor_ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _one_update_is_one_all_reduce(model, rank):
    opt = optorch.chain(optorch.clip_by_global_norm(0.5), optorch.adamw(0.01, weight_decay=0.1))
    params = dict(model.named_parameters())
    state = opt.init(params)
    for step in range(3):
        x, y = batch(step)
        grads = gradients(model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        with Recorder() as recorded:
            updates, state = opt.update(grads, state, params)
        optorch.apply_updates(params, updates)
        assert recorded.collectives == ["c10d.allreduce_.default"], recorded.collectives
        assert recorded.dtensor_ops == [], recorded.dtensor_ops[:5]
    return opt, params, state


def _checkpoint_roundtrip(opt, params, state, tmp_dir):
    """A DCP checkpoint of the state saves it sharded and loads into a fresh template."""
    path = os.path.join(tmp_dir, "checkpoint")
    dcp_save({"opt": optorch.state_dict(state)}, checkpoint_id=path)
    template = opt.init(params)
    loaded = {"opt": optorch.state_dict(template)}
    dcp_load(loaded, checkpoint_id=path)
    restored = optorch.load_state_dict(template, loaded["opt"])
    for ours, theirs in zip(_leaves(optorch.state_dict(restored)), _leaves(optorch.state_dict(state))):
        assert type(ours) is type(theirs)
        if isinstance(theirs, DTensor):
            assert ours.placements == theirs.placements
            ours, theirs = ours.to_local(), theirs.to_local()
        assert torch.equal(ours, theirs)
    plain = optorch.state_dict(opt.init(params))
    plain[1][0]["exp_avg"]["0.weight"] = plain[1][0]["exp_avg"]["0.weight"].full_tensor()  # [clip, [adam, ...]]
    with pytest.raises(ValueError, match="plain tensor but the state holds a DTensor"):
        optorch.load_state_dict(template, plain)


def _unscale_agrees_across_shards(model, rank):
    """amp's overflow verdict covers every shard: an inf in one process's shard skips the step on all."""
    scaler = optorch.amp.dynamic_loss_scale(init_scale=16.0)
    x, y = batch(0)
    grads = gradients(model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
    expected = {k: g.full_tensor() / 16.0 for k, g in grads.items()}
    assert scaler.unscale(grads, scaler.init()).item() == 0.0
    for k, g in grads.items():
        torch.testing.assert_close(g.full_tensor(), expected[k], rtol=0, atol=0, msg=k)
    if rank == 1:
        grads["0.weight"].to_local()[0, 0] = float("inf")
    assert scaler.unscale(grads, scaler.init()).item() == 1.0


def _norm_types(model, rank):
    """optorch.norms for other norm types, including a parameter whose shard on one process is empty."""
    params = dict(model.named_parameters())
    assert params["5.weight"].to_local().shape == (1 - rank, 3)  # one row over two processes
    for norm_type in (1.0, 3.0, float("inf")):
        full = [p.full_tensor() for p in params.values()]
        for norm, whole in zip(optorch.norms(params.values(), norm_type), full):
            torch.testing.assert_close(norm, torch.linalg.vector_norm(whole, norm_type), **TOL)


def _run_checks(rank, tmp_dir):
    mesh = init_device_mesh("cpu", (WORLD,))
    model = sharded_copy(make_model(), mesh)
    _checkpoint_roundtrip(*_one_update_is_one_all_reduce(model, rank), tmp_dir)
    _unscale_agrees_across_shards(model, rank)
    _norm_types(model, rank)


def test_sharded_update_all_reduces_once_and_checkpoints_sharded(tmp_path):
    spawn(_run_checks, tmp_path, str(tmp_path))
