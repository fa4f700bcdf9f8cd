"""Schedules: pure functions `step -> multiplier`, clamped outside their range.

A schedule here is a multiplier (peak 1.0); `scaled(lr, schedule)` turns one into a learning
rate schedule that any optimizer in `optorch.alias` accepts. Steps before 0 count as 0 and
steps past the end keep the final value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

Schedule = Callable[[int], float]


def _nonneg(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0.")
    return value


def _steps(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0.")
    return value


def _progress(step: int, length: int) -> float:
    """Fraction of a phase of `length` steps done at `step`, clamped to [0, 1]."""
    return 1.0 if length == 0 else min(max(step, 0), length) / length


def constant(value: float = 1.0) -> Schedule:
    _nonneg("value", value)
    return lambda step: value


def linear_warmup(warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """init_value at step 0, rising linearly to 1 at `warmup_steps`, then 1."""
    _steps("warmup_steps", warmup_steps)
    _nonneg("init_value", init_value)
    return lambda step: init_value + (1.0 - init_value) * _progress(step, warmup_steps)


def cosine_decay(decay_steps: int, floor: float = 0.0) -> Schedule:
    """1 at step 0, half a cosine down to `floor` at `decay_steps`, then `floor`."""
    _steps("decay_steps", decay_steps)
    _nonneg("floor", floor)
    return lambda step: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, decay_steps)))


def linear_warmdown(decay_steps: int, floor: float = 0.0) -> Schedule:
    """1 at step 0, linearly down to `floor` at `decay_steps`, then `floor`."""
    _steps("decay_steps", decay_steps)
    _nonneg("floor", floor)
    return lambda step: 1.0 - (1.0 - floor) * _progress(step, decay_steps)


def rsqrt(warmup_steps: int, timescale: int | None = None, init_value: float = 0.0) -> Schedule:
    """Linear warmup, then (1 + (step − warmup) / timescale)^(−1/2); timescale defaults to warmup,
    giving the Transformer's √(warmup / step)."""
    _steps("warmup_steps", warmup_steps)
    timescale = max(warmup_steps, 1) if timescale is None else timescale
    if _steps("timescale", timescale) == 0:
        raise ValueError("timescale=0 must be an integer >= 1.")
    warmup = linear_warmup(warmup_steps, init_value)
    decay = lambda step: (1.0 + max(step, 0) / timescale) ** -0.5  # noqa: E731
    return join_schedules([warmup, decay], [warmup_steps])


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule i runs from boundaries[i-1] on, seeing the step counted from its own start."""
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries has {len(boundaries)} entries; {len(schedules)} schedules need {len(schedules) - 1}."
        )
    for i, b in enumerate(boundaries):
        _steps(f"boundaries[{i}]", b)
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries={list(boundaries)} must be non-decreasing.")
    starts = [0, *boundaries]

    def schedule(step: int) -> float:
        i = bisect.bisect_right(boundaries, step)
        return schedules[i](step - starts[i])

    return schedule


def warmup_cosine(total_steps: int, warmup_steps: int = 0, floor: float = 0.0, init_value: float = 0.0) -> Schedule:
    """Linear warmup to 1, then cosine decay to `floor` at `total_steps`."""
    _check_phases(total_steps, warmup_steps)
    return join_schedules(
        [linear_warmup(warmup_steps, init_value), cosine_decay(total_steps - warmup_steps, floor)], [warmup_steps]
    )


def warmup_stable_decay(
    total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2, floor: float = 0.0, init_value: float = 0.0
) -> Schedule:
    """WSD: linear warmup, constant 1, then a linear decay to `floor` over the last
    `decay_fraction` of `total_steps`."""
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction} must be in [0, 1].")
    _check_phases(total_steps, warmup_steps)
    decay_steps = round(decay_fraction * total_steps)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} plus the decay ({decay_steps} steps) exceed total_steps={total_steps}."
        )
    stable_end = total_steps - decay_steps
    return join_schedules(
        [linear_warmup(warmup_steps, init_value), constant(1.0), linear_warmdown(decay_steps, floor)],
        [warmup_steps, stable_end],
    )


class Scaled:
    """`peak · multiplier(step)`: a learning-rate schedule that knows its peak (what independent
    weight decay divides by: `optorch.adamw(independent_weight_decay=True)`)."""

    def __init__(self, peak: float, multiplier: Schedule):
        self.peak, self.multiplier = peak, multiplier

    def __call__(self, step: int) -> float:
        return self.peak * self.multiplier(step)


def scaled(value: float, schedule: Schedule) -> Scaled:
    """`value · schedule(step)`: a learning-rate schedule from a peak value and a multiplier."""
    _nonneg("value", value)
    return Scaled(value, schedule)


def _check_phases(total_steps: int, warmup_steps: int):
    _steps("total_steps", total_steps)
    _steps("warmup_steps", warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} is longer than total_steps={total_steps}.")
