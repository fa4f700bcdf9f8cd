"""State is plain checkpointable data; bad input raises and changes nothing; helpers."""

import io

import pytest
import torch

import optorch
from optorch import schedules

from .helpers import grads_of, make_params, run_optorch

OPTIMIZERS = {
    "adamw_schedule_clip": lambda: optorch.chain(
        optorch.clip_by_global_norm(1.0),
        optorch.adamw(schedules.scaled(0.05, schedules.warmup_cosine(20, 5)), weight_decay=0.1, amsgrad=True),
    ),
    "sgd_nesterov": lambda: optorch.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "lion_masked": lambda: optorch.lion(
        1e-3, weight_decay=0.1, weight_decay_mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}
    ),
    "lamb": lambda: optorch.lamb(0.01, weight_decay=0.01),
    "lars": lambda: optorch.lars(0.1, trust_coefficient=0.01),
    "groups": lambda: optorch.multi_transform(
        {"a": optorch.adam(0.01), "b": optorch.sgd(0.1, momentum=0.5)},
        lambda p: {k: "ab"[v.ndim % 2] for k, v in p.items()},
    ),
}


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bitwise_identical(name):
    make = OPTIMIZERS[name]
    straight, _ = run_optorch(make(), 20)

    first, state = run_optorch(make(), 10)
    saved = roundtrip({"params": {k: p.detach() for k, p in first.items()}, "opt": optorch.state_dict(state)})
    params = {k: p.clone().requires_grad_() for k, p in saved["params"].items()}
    opt = make()
    restored = optorch.load_state_dict(opt.init(params), saved["opt"])
    resumed, _ = run_optorch(opt, 10, params, restored)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_state_namedtuples_load_with_weights_only():
    _, state = run_optorch(OPTIMIZERS["adamw_schedule_clip"](), 3)
    loaded = roundtrip(state)
    assert type(loaded[1][0]) is type(state[1][0])
    assert torch.equal(loaded[1][0].exp_avg["w1"], state[1][0].exp_avg["w1"])


def test_load_state_dict_names_the_mismatch():
    opt = optorch.adam(0.1)
    saved = optorch.state_dict(opt.init(make_params()))
    other = make_params()
    other["w1"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exp_avg\['w1'\].*shape"):
        optorch.load_state_dict(opt.init(other), saved)
    with pytest.raises(ValueError, match="missing"):
        optorch.load_state_dict(opt.init({k: v for k, v in other.items() if k != "b1"}), saved)


def test_state_norms_are_the_buffers_norms():
    _, state = run_optorch(optorch.adamw(0.01, amsgrad=True), 5)
    norms = optorch.state_norms(state)
    adam = state[0]
    assert set(norms) == {f"{f}/{k}" for f in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") for k in adam.exp_avg}
    for k, buf in adam.exp_avg_sq.items():
        assert norms[f"exp_avg_sq/{k}"].item() == pytest.approx(buf.pow(2).sum().sqrt().item(), rel=1e-12)


def snapshot(tree):
    return {k: v.detach().clone() for k, v in tree.items()}


def assert_unchanged(before, after):
    for k in before:
        assert torch.equal(before[k], after[k]), k


def _adam_state_snapshot(state):
    return {f"{f}.{k}": t.clone() for f in ("exp_avg", "exp_avg_sq") for k, t in getattr(state[0], f).items()}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda g: {**g, "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
        (lambda g: {**g, "w1": torch.zeros(4, 5, dtype=torch.float64)}, r"updates\['w1'\] has shape \(4, 5\)"),
    ],
)
def test_bad_grads_raise_and_change_nothing(corrupt, message):
    params, state = run_optorch(optorch.chain(optorch.clip_by_global_norm(0.1), optorch.adamw(0.1)), 2)
    grads = grads_of(params)
    p0, g0, s0 = snapshot(params), snapshot(grads), _adam_state_snapshot(state[1])
    opt = optorch.chain(optorch.clip_by_global_norm(0.1), optorch.adamw(0.1))
    with pytest.raises(ValueError, match=message):
        opt.update(corrupt(grads), state, params)
    assert_unchanged(p0, params)
    assert_unchanged(g0, grads)  # not even the clipping before the failing transform ran
    assert_unchanged(s0, _adam_state_snapshot(state[1]))
    assert all(int(c) == 2 for c in state[1][0].count.values())


def test_nan_schedule_raises_at_its_step_and_changes_nothing():
    lr = lambda step: 0.1 if step < 3 else float("nan")  # noqa: E731
    opt = optorch.adamw(lr)
    params, state = run_optorch(opt, 3)
    p0, s0 = snapshot(params), _adam_state_snapshot(state)
    with pytest.raises(ValueError, match=r"learning_rate\(3\) is -?nan"):
        opt.update(grads_of(params), state, params)
    assert_unchanged(p0, params)
    assert_unchanged(s0, _adam_state_snapshot(state))
    assert all(int(c) == 3 for c in state[0].count.values())


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_non_finite_learning_rate_is_rejected(lr):
    with pytest.raises(ValueError, match="learning_rate"):
        optorch.sgd(lr)


def test_apply_updates_moves_only_the_updated_parameters_and_checks_keys():
    params = make_params()
    before = snapshot(params)
    optorch.apply_updates(params, {"w1": torch.ones(5, 4, dtype=torch.float64)})
    torch.testing.assert_close(params["w1"].detach(), before["w1"] + 1)
    assert all(torch.equal(params[k], before[k]) for k in params if k != "w1")
    with pytest.raises(ValueError, match=r"unexpected \['nope'\]"):
        optorch.apply_updates(params, {"nope": torch.zeros(1)})


def test_callable_mask_needs_params():
    opt = optorch.adamw(0.1, weight_decay_mask=lambda p: {k: True for k in p})
    params = make_params()
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(grads_of(params), opt.init(params), None)


def test_default_weight_decay_mask_is_by_module_type():
    """Linear and convolution weights decay; embeddings (also tied), norms, biases and bare
    parameters (position tables, tokens, gains) do not -- whatever they are called."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(10, 4)
            self.patch_embed = torch.nn.Linear(4, 4)  # a projection, though its name says "embed"
            self.conv = torch.nn.Conv1d(4, 4, 3, groups=4)
            self.norm = torch.nn.LayerNorm(4)
            self.gain = torch.nn.Parameter(torch.ones(4, 4))  # 2-D, yet not a layer's weight
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.token_embedding.weight  # tied: still an embedding table

    mask = optorch.default_weight_decay_mask(Net())
    assert mask == {
        "token_embedding.weight": False,
        "patch_embed.weight": True,
        "patch_embed.bias": False,
        "conv.weight": True,
        "conv.bias": False,
        "norm.weight": False,
        "norm.bias": False,
        "gain": False,
        "pos_embed": False,
    }
