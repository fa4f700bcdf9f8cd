"""LAMB, LARS and Lion against step-by-step transcriptions of the papers' update rules."""

import pytest
import torch

import optorch

from .helpers import grads_of, make_params, run_optorch

STEPS = 30


def reference_run(step_fn, steps=STEPS):
    """Run `step_fn(name, w, g, slot, t) -> new w` on plain tensors, one parameter at a time."""
    params = make_params()
    slots = {k: {} for k in params}
    for t in range(1, steps + 1):
        grads = grads_of(params)
        with torch.no_grad():
            for k, w in params.items():
                w.copy_(step_fn(w.clone(), grads[k], slots[k], t))
    return params


def trust(w_norm, u_norm, coefficient=1.0, eps=0.0):
    return coefficient * w_norm / (u_norm + eps) if w_norm > 0 and u_norm > 0 else 1.0


def assert_same(ours, theirs):
    for k in theirs:
        torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lamb(weight_decay):
    lr, b1, b2, eps = 0.02, 0.9, 0.99, 1e-6

    def step(w, g, s, t):  # You et al. 2019, Algorithm 2
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        r = (s["m"] / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps)
        u = r + weight_decay * w
        return w - lr * trust(w.norm(), u.norm()) * u

    ours, _ = run_optorch(optorch.lamb(lr, b1, b2, eps, weight_decay), STEPS)
    assert_same(ours, reference_run(step))


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars(nesterov):
    lr, mu, wd, eta = 0.1, 0.9, 1e-3, 0.01

    def step(w, g, s, t):  # You et al. 2017, Algorithm 1 (with the norm of g + wd·w)
        u = g + wd * w
        scaled = lr * trust(w.norm(), u.norm(), eta) * u
        s["v"] = mu * s.get("v", 0) + scaled
        return w - (scaled + mu * s["v"] if nesterov else s["v"])

    ours, _ = run_optorch(optorch.lars(lr, mu, nesterov, wd, trust_coefficient=eta), STEPS)
    assert_same(ours, reference_run(step))


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion(weight_decay):
    lr, b1, b2 = 3e-3, 0.9, 0.99

    def step(w, g, s, t):  # Chen et al. 2023, Algorithm 2
        m = s.get("m", torch.zeros_like(g))
        c = b1 * m + (1 - b1) * g
        s["m"] = b2 * m + (1 - b2) * g
        return w - lr * (torch.sign(c) + weight_decay * w)

    ours, _ = run_optorch(optorch.lion(lr, b1, b2, weight_decay), STEPS)
    assert_same(ours, reference_run(step))


def test_trust_ratio_is_one_for_zero_norms():
    params = {"zero": torch.zeros(3, dtype=torch.float64), "w": torch.ones(2, dtype=torch.float64)}
    updates = {"zero": torch.ones(3, dtype=torch.float64), "w": torch.zeros(2, dtype=torch.float64)}
    t = optorch.scale_by_trust_ratio()
    out, _ = t.update(updates, t.init(params), params)
    assert torch.equal(out["zero"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(out["w"], torch.zeros(2, dtype=torch.float64))


def test_lars_trust_ratio_mask_leaves_masked_out_params_unscaled():
    params = make_params()
    mask = {k: p.ndim >= 2 for k, p in params.items()}
    opt = optorch.lars(0.1, momentum=0.0, trust_coefficient=0.01, trust_ratio_mask=mask)
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = grads_of(params)
    updates, _ = opt.update({k: g.clone() for k, g in grads.items()}, opt.init(params), params)
    for k in params:
        expected = -0.1 * grads[k] * (trust(before[k].norm(), grads[k].norm(), 0.01) if mask[k] else 1.0)
        torch.testing.assert_close(updates[k], expected, rtol=1e-12, atol=0)


def test_independent_weight_decay_follows_the_schedule_not_the_peak():
    """Wortsman et al. 2023: p ← p − lr_t·adam − wd·(lr_t / peak)·p, AdamW's moments as torch's."""
    peak, wd, b1, b2, eps = 0.05, 0.1, 0.9, 0.95, 1e-8
    multiplier = optorch.schedules.warmup_cosine(STEPS, 5)

    def step(w, g, s, t):
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        adam = (s["m"] / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps)
        lr = peak * multiplier(t - 1)
        return w - lr * adam - wd * (lr / peak) * w

    lr = optorch.schedules.scaled(peak, multiplier)
    ours, _ = run_optorch(optorch.adamw(lr, b1, b2, eps, wd, independent_weight_decay=True), STEPS)
    assert_same(ours, reference_run(step))
    with pytest.raises(ValueError, match="peak learning rate"):
        optorch.adamw(lambda step: 0.1, weight_decay=wd, independent_weight_decay=True)
