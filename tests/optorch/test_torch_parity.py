"""optorch's SGD / Adam / AdamW against torch.optim in float64: 40 steps, ≤ 1e-10 relative."""

import itertools

import pytest
import torch

import optorch
from optorch import schedules

from .conftest import grads_of, make_params, run_optorch

STEPS = 40


def run_torch(make_opt, steps=STEPS, clip=None, lr_lambda=None, maximize=False):
    params = make_params()
    opt = make_opt(list(params.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    for _ in range(steps):
        for k, g in grads_of(params, maximize).items():
            params[k].grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
        if sched:
            sched.step()
    return params


def assert_same(ours, theirs):
    for k in theirs:
        torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), rtol=1e-10, atol=1e-12, msg=k)


SGD_CASES = [
    dict(lr=lr, momentum=mo, dampening=da, nesterov=ne, weight_decay=wd, maximize=mx)
    for lr, mo, da, ne, wd, mx in itertools.product(
        [0.05, 0.01], [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True]
    )
    if not (ne and (mo == 0 or da != 0))
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd(kw):
    theirs = run_torch(lambda p: torch.optim.SGD(p, **kw), maximize=kw["maximize"])
    kw = dict(kw)
    ours, _ = run_optorch(optorch.sgd(learning_rate=kw.pop("lr"), **kw), STEPS, maximize=kw["maximize"])
    assert_same(ours, theirs)


ADAM_CASES = [
    dict(lr=lr, betas=b, weight_decay=wd, amsgrad=ams, maximize=mx, eps=eps)
    for lr, b, wd, ams, mx, eps in itertools.product(
        [1e-3, 0.05], [(0.9, 0.999), (0.8, 0.9)], [0.0, 0.1], [False, True], [False, True], [1e-8, 1e-3]
    )
]


def _optorch_adam_kwargs(kw):
    kw = dict(kw)
    b1, b2 = kw.pop("betas")
    return dict(learning_rate=kw.pop("lr"), b1=b1, b2=b2, **kw)


@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam(kw):
    theirs = run_torch(lambda p: torch.optim.Adam(p, foreach=False, **kw), maximize=kw["maximize"])
    ours, _ = run_optorch(optorch.adam(**_optorch_adam_kwargs(kw)), STEPS, maximize=kw["maximize"])
    assert_same(ours, theirs)


@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adamw(kw):
    theirs = run_torch(lambda p: torch.optim.AdamW(p, foreach=False, **kw), maximize=kw["maximize"])
    ours, _ = run_optorch(optorch.adamw(**_optorch_adam_kwargs(kw)), STEPS, maximize=kw["maximize"])
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    "multiplier",
    [
        schedules.warmup_cosine(STEPS, warmup_steps=8, floor=0.1),
        schedules.warmup_stable_decay(STEPS, warmup_steps=5, decay_fraction=0.25),
        schedules.rsqrt(warmup_steps=6),
    ],
    ids=["warmup_cosine", "wsd", "rsqrt"],
)
def test_adamw_schedule_matches_lambda_lr(multiplier):
    theirs = run_torch(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), lr_lambda=multiplier)
    opt = optorch.adamw(learning_rate=schedules.scaled(0.05, multiplier), weight_decay=0.1)
    ours, _ = run_optorch(opt, STEPS)
    assert_same(ours, theirs)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_clip_grad_norm(max_norm):
    theirs = run_torch(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), clip=max_norm)
    opt = optorch.chain(optorch.clip_by_global_norm(max_norm), optorch.sgd(0.05, momentum=0.9))
    ours, state = run_optorch(opt, STEPS)
    assert_same(ours, theirs)
    assert state[0].global_norm > 0  # the pre-clip norm is kept for the diagnostics


def test_param_groups_match_torch_groups():
    """multi_transform / weight-decay masks == torch param groups with different weight decay."""
    mask = {k: p.ndim >= 2 for k, p in make_params().items()}

    def torch_groups(plist):
        names = list(make_params())
        decay = [p for n, p in zip(names, plist) if mask[n]]
        rest = [p for n, p in zip(names, plist) if not mask[n]]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.05, weight_decay=0.2)

    theirs = run_torch(torch_groups)
    masked, _ = run_optorch(optorch.adamw(0.05, weight_decay=0.2, weight_decay_mask=mask), STEPS)
    assert_same(masked, theirs)
    labels = {k: "decay" if m else "no_decay" for k, m in mask.items()}
    grouped = optorch.multi_transform(
        {"decay": optorch.adamw(0.05, weight_decay=0.2), "no_decay": optorch.adamw(0.05, weight_decay=0.0)}, labels
    )
    ours, _ = run_optorch(grouped, STEPS)
    assert_same(ours, theirs)
