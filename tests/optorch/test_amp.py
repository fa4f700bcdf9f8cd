"""Dynamic loss scaling against torch.amp.GradScaler on the same finite / inf / nan sequence."""

import math

import pytest
import torch

import optorch

# (gradient multiplier, poison): poison puts an inf or nan into one element of one gradient
SEQUENCE = [(1, None)] * 3 + [(1, "inf"), (1, "nan"), (1, None)] + [(1, None)] * 7 + [(1, "nan")] + [(1, None)] * 4


def scaled_grads(step, scale, poison):
    g = torch.Generator().manual_seed(step)
    grads = {"a": torch.randn(4, 3, generator=g) * scale, "b": torch.randn(5, generator=g).double() * scale}
    if poison:
        grads["b" if step % 2 else "a"].view(-1)[1] = float(poison)
    return grads


@pytest.mark.parametrize("growth_interval", [1, 3])
def test_matches_grad_scaler(growth_interval):
    kw = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.25, growth_interval=growth_interval)
    torch_params = [torch.zeros(4, 3, requires_grad=True), torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    torch_opt = torch.optim.SGD(torch_params, lr=1.0)
    torch_scaler = torch.amp.GradScaler("cpu", **kw)
    scaler = optorch.amp.dynamic_loss_scale(**kw)
    ls = scaler.init()
    params = {"a": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.float64)}
    opt = optorch.sgd(1.0)
    state = opt.init(params)

    for step, (_, poison) in enumerate(SEQUENCE):
        loss = torch.tensor(3.0)
        assert torch.equal(scaler.scale(loss, ls), torch_scaler.scale(loss)), f"step {step}"
        scale = torch_scaler.get_scale()

        ours = scaled_grads(step, scale, poison)
        for p, g in zip(torch_params, scaled_grads(step, scale, poison).values()):
            p.grad = g
        torch_scaler.unscale_(torch_opt)
        found_inf = scaler.unscale(ours, ls)
        skipped = bool(found_inf.item())
        assert skipped == (poison is not None)
        if not skipped:
            for p, g in zip(torch_params, ours.values()):
                torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
            updates, state = opt.update(ours, state, params)
            optorch.apply_updates(params, updates)
        torch_scaler.step(torch_opt)
        torch_scaler.update()
        ls = scaler.update(ls, found_inf)
        assert int(ls.growth_tracker) == int(torch_scaler._growth_tracker), f"step {step}"
        for p, q in zip(torch_params, params.values()):
            assert torch.equal(p.detach(), q), f"step {step}: skipped steps must not change params"
    assert float(ls.scale) == torch_scaler.get_scale()


def test_growth_stops_at_float32_max():
    scaler = optorch.amp.dynamic_loss_scale(init_scale=3e38, growth_interval=1)
    ls = scaler.update(scaler.init(), torch.zeros(()))
    assert math.isfinite(float(ls.scale)) and float(ls.scale) == pytest.approx(3e38)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="backoff_factor"):
        optorch.amp.dynamic_loss_scale(backoff_factor=2.0)
