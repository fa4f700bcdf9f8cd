"""Functional dynamic loss scaling for fp16, with torch.amp.GradScaler's semantics.

scaler = optorch.amp.dynamic_loss_scale()
ls = scaler.init(device)
scaler.scale(loss, ls).backward()
found_inf = scaler.unscale(grads, ls)      # in place; detects inf and nan
if not found_inf.item():                   # the one host sync, as GradScaler's
    updates, state = opt.update(grads, state, params); optorch.apply_updates(params, updates)
ls = scaler.update(ls, found_inf)          # back off on overflow, grow after N good steps
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import torch

from .base import register_state
from .sharding import any_over_shards, local


@register_state
class LossScaleState(NamedTuple):
    scale: torch.Tensor  # fp32 scalar
    growth_tracker: torch.Tensor  # int32 scalar: consecutive finite steps since the last change


class LossScaler(NamedTuple):
    init: Callable[..., LossScaleState]
    scale: Callable[[torch.Tensor, LossScaleState], torch.Tensor]
    unscale: Callable[[dict[str, torch.Tensor], LossScaleState], torch.Tensor]
    update: Callable[[LossScaleState, torch.Tensor], LossScaleState]


def dynamic_loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> LossScaler:
    if init_scale <= 0 or growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0 or growth_interval < 1:
        raise ValueError(
            "dynamic_loss_scale needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
            f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval}."
        )

    def init(device=None) -> LossScaleState:
        return LossScaleState(
            torch.full((), init_scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
        )

    def scale(loss, state):
        return loss * state.scale.to(loss.dtype)

    def unscale(grads, state):
        """Divide grads by the scale in place; return 1.0 if any was inf or nan, else 0.0.

        With sharded grads the verdict covers every shard (one all_reduce), so that all processes
        skip the same steps and a parameter's shards never part ways."""
        found_inf = torch.zeros((), dtype=torch.float32, device=state.scale.device)
        inv_scale = state.scale.double().reciprocal().float()
        by_dtype = defaultdict(list)
        for g in local(grads.values()):
            by_dtype[g.dtype].append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        return any_over_shards(found_inf, grads.values())

    def update(state, found_inf):
        overflow = found_inf > 0
        tracker = torch.where(overflow, 0, state.growth_tracker + 1)
        grow = tracker >= growth_interval
        grown = state.scale * growth_factor
        new_scale = torch.where(
            overflow,
            state.scale * backoff_factor,
            torch.where(grow & torch.isfinite(grown), grown, state.scale),
        )
        return LossScaleState(new_scale, torch.where(grow, 0, tracker).to(torch.int32))

    return LossScaler(init, scale, unscale, update)
