"""A small float64 problem with several parameter shapes, shared by the optorch tests."""

import torch

import optorch

SHAPES = {"embed": (7, 5), "w1": (5, 4), "b1": (4,), "conv": (3, 2, 2), "scale": (1,)}


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for k, s in SHAPES.items()}


def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-quadratic, so a wrong update changes later gradients and the trajectories drift apart."""
    total = 0.0
    for i, p in enumerate(params.values()):
        total = total + ((p - 0.1 * (i + 1)) ** 2).sum() + 0.1 * torch.sin(3 * p).sum() + 0.05 * (p**4).mean()
    return total


def grads_of(params: dict[str, torch.Tensor], maximize: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of the loss, or of −loss when maximizing (so both directions converge)."""
    names = list(params)
    objective = -loss_fn(params) if maximize else loss_fn(params)
    grads = torch.autograd.grad(objective, [params[k] for k in names])
    return dict(zip(names, grads))


def run_optorch(opt, steps: int, params=None, state=None, maximize: bool = False):
    params = make_params() if params is None else params
    state = opt.init(params) if state is None else state
    for _ in range(steps):
        updates, state = opt.update(grads_of(params, maximize), state, params)
        optorch.apply_updates(params, updates)
    return params, state
