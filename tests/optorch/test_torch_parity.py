"""optorch's SGD / Adam / AdamW against torch.optim in float64: 40 steps, ≤ 1e-10 relative."""

import itertools

import pytest
import torch

import optorch
from optorch import schedules

from .helpers import grads_of, make_params, run_optorch

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


# ---- parameters without a gradient --------------------------------------------------------------

SPARSE = {  # parameter -> the steps on which it gets no gradient
    "embed": set(range(STEPS)),  # never used (a frozen or unused parameter)
    "w1": {s for s in range(STEPS) if s % 3 == 1},  # used on some steps only
    "conv": {0, 1, 2},  # first used at step 3: momentum and bias corrections start there
}
NO_GRAD_CASES = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), lambda: optorch.adamw(0.01, weight_decay=0.1)),
    "adam_amsgrad": (
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, weight_decay=0.05),
        lambda: optorch.adam(0.01, amsgrad=True, weight_decay=0.05),
    ),  # fmt: skip
    "sgd_nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda: optorch.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),  # fmt: skip
    "sgd_clipped": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5), lambda: optorch.sgd(0.05, momentum=0.5)),
}


@pytest.mark.parametrize("name", NO_GRAD_CASES)
def test_parameters_without_gradients_are_left_alone_as_torch_does(name):
    """torch.optim skips a parameter whose .grad is None (no step, no decay, no state change);
    optorch does the same for a parameter missing from the grads dict."""
    make_torch, make_ours = NO_GRAD_CASES[name]
    clip = 0.5 if name.endswith("clipped") else None
    theirs, ours = make_params(), make_params()
    initial = {k: p.detach().clone() for k, p in ours.items()}
    torch_opt = make_torch(list(theirs.values()))
    opt = optorch.chain(*([optorch.clip_by_global_norm(clip)] if clip else []), make_ours())
    state = opt.init(ours)
    for step in range(STEPS):
        grads = {k: g for k, g in grads_of(theirs).items() if step not in SPARSE.get(k, ())}
        for k, p in theirs.items():
            p.grad = grads.get(k)
        if clip:
            torch.nn.utils.clip_grad_norm_(list(theirs.values()), clip)
        torch_opt.step()
        ours_grads = {k: g for k, g in grads_of(ours).items() if step not in SPARSE.get(k, ())}
        updates, state = opt.update(ours_grads, state, ours)
        optorch.apply_updates(ours, updates)
    assert_same(ours, theirs)
    assert torch.equal(ours["embed"], initial["embed"])  # never had a gradient: never moved


# ---- the arguments torch.optim rejects ----------------------------------------------------------

BAD_ARGUMENTS = [
    (torch.optim.SGD, optorch.sgd, dict(lr=0.1, momentum=0.0, nesterov=True)),
    (torch.optim.SGD, optorch.sgd, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    (torch.optim.SGD, optorch.sgd, dict(lr=-0.1)),
    (torch.optim.SGD, optorch.sgd, dict(lr=0.1, momentum=-0.5)),
    (torch.optim.SGD, optorch.sgd, dict(lr=0.1, weight_decay=-1.0)),
    (torch.optim.Adam, optorch.adam, dict(lr=-1e-3)),
    (torch.optim.Adam, optorch.adam, dict(lr=1e-3, betas=(1.0, 0.999))),
    (torch.optim.Adam, optorch.adam, dict(lr=1e-3, betas=(0.9, -0.1))),
    (torch.optim.AdamW, optorch.adamw, dict(lr=1e-3, eps=-1e-8)),
    (torch.optim.AdamW, optorch.adamw, dict(lr=1e-3, weight_decay=-0.1)),
]


@pytest.mark.parametrize("torch_cls, ours, kw", BAD_ARGUMENTS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_torch_argument_errors(torch_cls, ours, kw):
    with pytest.raises(ValueError):
        torch_cls([torch.zeros(1, requires_grad=True)], **kw)
    kw = dict(kw)
    if "betas" in kw:
        kw["b1"], kw["b2"] = kw.pop("betas")
    with pytest.raises(ValueError, match="Invalid|Nesterov"):
        ours(learning_rate=kw.pop("lr"), **kw)
