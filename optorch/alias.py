"""Named optimizers, each a `chain` of transforms with torch.optim's (or the paper's) semantics.

`learning_rate` is a float or a schedule `step -> learning rate`. `weight_decay_mask` (a dict
name -> bool, or a callable params -> dict) restricts weight decay, e.g. to
`optorch.default_weight_decay_mask(model)`. Arguments torch.optim rejects raise the same
`ValueError` here.
"""

from __future__ import annotations

from .base import GradientTransformation, chain
from .transforms import (
    Mask,
    Schedule,
    add_decayed_weights,
    masked,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_trust_ratio,
    trace,
)

LearningRate = float | Schedule


def _compose(*transforms: GradientTransformation | None) -> GradientTransformation:
    """`chain` of the transforms that are switched on (options that are off cost nothing)."""
    return chain(*(t for t in transforms if t is not None))


def _decay(weight_decay: float, mask: Mask | None):
    return add_decayed_weights(weight_decay, mask) if weight_decay else None


def _negate(maximize: bool):
    return scale(-1.0) if maximize else None


def _check(**bounds):
    """torch.optim's argument checks: name=(value, low, high, high_inclusive) with low inclusive."""
    for name, (value, low, high, high_inclusive) in bounds.items():
        if value is None or callable(value):
            continue
        above = value > high if high_inclusive else value >= high
        if value < low or above:
            interval = f"[{low}, {high}{']' if high_inclusive else ')'}"
            raise ValueError(f"Invalid {name}: {value} (must be in {interval}).")


INF = float("inf")


def _adam_checks(learning_rate, b1, b2, eps, weight_decay):
    _check(learning_rate=(learning_rate, 0, INF, True), eps=(eps, 0, INF, True), b1=(b1, 0, 1, False),
           b2=(b2, 0, 1, False), weight_decay=(weight_decay, 0, INF, True))  # fmt: skip


def sgd(
    learning_rate: LearningRate,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    weight_decay_mask: Mask | None = None,
) -> GradientTransformation:
    """torch.optim.SGD: L2 weight decay added to the gradient, then momentum, then the step."""
    _check(learning_rate=(learning_rate, 0, INF, True), momentum=(momentum, 0, INF, True),
           weight_decay=(weight_decay, 0, INF, True))  # fmt: skip
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD).")
    return _compose(
        _negate(maximize),
        _decay(weight_decay, weight_decay_mask),
        trace(momentum, nesterov, dampening) if momentum else None,
        scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    weight_decay_mask: Mask | None = None,
) -> GradientTransformation:
    """torch.optim.Adam: weight decay is L2 (added to the gradient before the moments)."""
    _adam_checks(learning_rate, b1, b2, eps, weight_decay)
    return _compose(
        _negate(maximize),
        _decay(weight_decay, weight_decay_mask),
        scale_by_adam(b1, b2, eps, amsgrad),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    weight_decay_mask: Mask | None = None,
    independent_weight_decay: bool = False,
) -> GradientTransformation:
    """torch.optim.AdamW: decoupled weight decay, p ← p − lr·(adam + wd·p).

    `independent_weight_decay` (Wortsman et al. 2023, "independent decoupling"): the decay follows
    the schedule but not the peak learning rate, p ← p − lr·adam − wd·(lr / peak)·p, so changing the
    learning rate leaves the decay alone. The peak is `learning_rate` itself, or the `peak` of an
    `optorch.schedules.scaled` schedule."""
    _adam_checks(learning_rate, b1, b2, eps, weight_decay)
    if independent_weight_decay:
        peak = getattr(learning_rate, "peak", None) if callable(learning_rate) else learning_rate
        if not peak:
            raise ValueError("independent_weight_decay divides the decay by the peak learning rate: give a number > 0, "
                             "or a schedule made by optorch.schedules.scaled(peak, multiplier).")  # fmt: skip
        weight_decay = weight_decay / peak
    return _compose(
        _negate(maximize),
        scale_by_adam(b1, b2, eps, amsgrad),
        _decay(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask | None = None,
) -> GradientTransformation:
    """LAMB (You et al. 2019): Adam direction + decoupled decay, scaled by ‖p‖ / ‖update‖."""
    _adam_checks(learning_rate, b1, b2, eps, weight_decay)
    return _compose(
        scale_by_adam(b1, b2, eps),
        _decay(weight_decay, weight_decay_mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: LearningRate,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    weight_decay_mask: Mask | None = None,
    trust_ratio_mask: Mask | None = None,
) -> GradientTransformation:
    """LARS (You et al. 2017): local lr η·‖p‖ / ‖g + wd·p‖, then momentum on lr-scaled steps."""
    _check(learning_rate=(learning_rate, 0, INF, True), momentum=(momentum, 0, INF, True),
           weight_decay=(weight_decay, 0, INF, True), trust_coefficient=(trust_coefficient, 0, INF, True),
           eps=(eps, 0, INF, True))  # fmt: skip
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum (as torch.optim.SGD).")
    trust = scale_by_trust_ratio(trust_coefficient, eps)
    return _compose(
        _decay(weight_decay, weight_decay_mask),
        trust if trust_ratio_mask is None else masked(trust, trust_ratio_mask),
        scale_by_learning_rate(learning_rate),  # momentum is linear: accumulating −lr·u is the same
        trace(momentum, nesterov) if momentum else None,
    )


def lion(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask | None = None,
) -> GradientTransformation:
    """Lion (Chen et al. 2023) with decoupled weight decay."""
    _check(learning_rate=(learning_rate, 0, INF, True), b1=(b1, 0, 1, True), b2=(b2, 0, 1, True),
           weight_decay=(weight_decay, 0, INF, True))  # fmt: skip
    return _compose(
        scale_by_lion(b1, b2),
        _decay(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
