"""Gradient transformations: the building blocks every named optimizer is composed of.

Each returns a `GradientTransformation`. Updates are modified in place (see `optorch.base`);
states are NamedTuples of tensors and dicts of tensors keyed by parameter name. `updates` may
hold a subset of the parameters (the others had no gradient): only those, and their state, are
touched. Step counters are int64 tensors on the CPU, so reading them for bias corrections never
syncs a GPU; moment transforms count steps per parameter, as torch.optim does.

Parameters may be DTensors (FSDP2): state made by `init` is then sharded like them, the math
runs on local shards and whole-tensor norms come from `optorch.norms` (see `optorch.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from .base import (
    GradientTransformation,
    Params,
    check_finite,
    check_tree,
    register_state,
    stateless,
)
from .sharding import as_updates, local, norms

Schedule = Callable[[int], float]
Mask = Mapping[str, bool] | Callable[[Params], Mapping[str, bool]]


def _zeros_like(params: Params) -> dict[str, torch.Tensor]:
    # a DTensor's zeros_like is a DTensor with its placement, so checkpoints save state sharded
    return {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}


def _step_counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _step_counters(params: Params) -> dict[str, torch.Tensor]:
    return {k: _step_counter() for k in params}


def _require_params(params, who: str):
    if params is None:
        raise ValueError(f"{who} needs the parameters: call opt.update(grads, state, params).")


def _check_state_dict(field: str):
    """A `check` comparing updates with the per-parameter state dict `field`."""

    def check(updates, state, params=None):
        check_tree(updates, getattr(state, field), "updates")

    return check


# ---- stateless scalings ----------------------------------------------------------------------


def identity() -> GradientTransformation:
    return stateless(lambda updates, params: updates)


def scale(factor: float) -> GradientTransformation:
    """Multiply updates by a constant."""
    factor = check_finite(factor, "scale factor", 0)

    def update(updates, params):
        torch._foreach_mul_(local(updates.values()), factor)
        return updates

    return stateless(update)


@register_state
class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor


def scale_by_schedule(schedule: Schedule, what: str = "schedule") -> GradientTransformation:
    """Multiply updates by `schedule(step)`; a non-finite value raises before anything changes."""

    def init(params):
        return ScaleByScheduleState(_step_counter())

    def value(state):
        step = int(state.count)
        return check_finite(schedule(step), f"{what}({step})", step)

    def check(updates, state, params=None):
        value(state)

    def update(updates, state, params=None):
        torch._foreach_mul_(local(updates.values()), value(state))
        state.count.add_(1)
        return updates, state

    return GradientTransformation(init, update, check)


def scale_by_learning_rate(learning_rate: float | Schedule, flip_sign: bool = True) -> GradientTransformation:
    """Multiply by −learning_rate (a float or a schedule `step -> lr`): descent direction."""
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda step: sign * learning_rate(step), "learning_rate")
    return scale(sign * check_finite(learning_rate, "learning_rate", 0))


# ---- moments ---------------------------------------------------------------------------------


@register_state
class ScaleByAdamState(NamedTuple):
    count: dict[str, torch.Tensor]  # steps each parameter has taken (its bias correction)
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    max_exp_avg_sq: dict[str, torch.Tensor]  # empty unless amsgrad


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's direction m̂ / (√v̂ + eps), eps added after the square root as in torch.optim.Adam."""
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta} must be in [0, 1).")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0.")

    def init(params):
        return ScaleByAdamState(
            _step_counters(params), _zeros_like(params), _zeros_like(params), _zeros_like(params) if amsgrad else {}
        )

    def update(updates, state, params=None):
        keys = list(updates)
        g = local(updates[k] for k in keys)
        m = local(state.exp_avg[k] for k in keys)
        v = local(state.exp_avg_sq[k] for k in keys)
        torch._foreach_lerp_(m, g, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, 1.0 - b2)
        if amsgrad:
            v_max = local(state.max_exp_avg_sq[k] for k in keys)
            torch._foreach_maximum_(v_max, v)
            v = v_max
        counts = [state.count[k] for k in keys]
        torch._foreach_add_(counts, 1)
        bc1, bc2 = zip(*((1.0 - b1**step, 1.0 - b2**step) for step in map(int, counts)))
        # m̂ / (√v̂ + eps) = m / (bc1/√bc2 · √v + bc1 · eps)
        alphas = [c1 / math.sqrt(c2) for c1, c2 in zip(bc1, bc2)]
        out = _div_by_affine_sqrt([updates[k] for k in keys], m, v, alphas, [c1 * eps for c1 in bc1])
        return dict(zip(keys, out)), state

    return GradientTransformation(init, update, _check_state_dict("exp_avg"))


def _div_by_affine_sqrt(out, num, den_sq, alphas: list[float], shifts: list[float]):
    """num / (alpha·√den_sq + shift) per tensor of the local shards `num` and `den_sq`, as updates
    like `out` (overwritten), written into `out`'s storage where that saves a pass."""
    shards = local(out)
    if shards and shards[0].device.type == "cpu":
        # CPU foreach ops are per-tensor loops anyway; with out= this is three passes over
        # memory and no allocation, which is what keeps AdamW at torch.optim's speed.
        shift_tensors = {}
        for o, n, d, alpha, shift in zip(shards, num, den_sq, alphas, shifts):
            s = shift_tensors.get((o.dtype, shift))
            if s is None:
                s = shift_tensors[o.dtype, shift] = torch.tensor(shift, dtype=o.dtype)
            torch.sqrt(d, out=o)
            torch.add(s, o, alpha=alpha, out=o)
            torch.div(n, o, out=o)
        return out
    denom = torch._foreach_sqrt(den_sq)
    torch._foreach_mul_(denom, alphas)
    torch._foreach_add_(denom, shifts)
    return as_updates(torch._foreach_div(num, denom), out)


@register_state
class ScaleByLionState(NamedTuple):
    exp_avg: dict[str, torch.Tensor]


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion (Chen et al. 2023): sign(b1·m + (1−b1)·g), then m ← b2·m + (1−b2)·g."""

    def init(params):
        return ScaleByLionState(_zeros_like(params))

    def update(updates, state, params=None):
        keys = list(updates)
        g = [updates[k] for k in keys]
        g_shards, m = local(g), local(state.exp_avg[k] for k in keys)
        direction = torch._foreach_lerp(m, g_shards, 1.0 - b1)
        torch._foreach_sign_(direction)
        torch._foreach_lerp_(m, g_shards, 1.0 - b2)
        return dict(zip(keys, as_updates(direction, g))), state

    return GradientTransformation(init, update, _check_state_dict("exp_avg"))


@register_state
class TraceState(NamedTuple):
    count: dict[str, torch.Tensor]  # steps each parameter has taken (its first copies the update)
    momentum_buffer: dict[str, torch.Tensor]


def trace(decay: float, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Heavy-ball momentum with torch.optim.SGD's semantics (the first step copies the update)."""
    if nesterov and (decay <= 0 or dampening != 0):
        raise ValueError("nesterov momentum needs momentum > 0 and dampening == 0 (as torch.optim.SGD).")

    def init(params):
        return TraceState(_step_counters(params), _zeros_like(params))

    def update(updates, state, params=None):
        keys = list(updates)
        started = [int(state.count[k]) > 0 for k in keys]
        torch._foreach_add_([state.count[k] for k in keys], 1)
        # torch.optim.SGD starts a parameter's buffer as a copy of its first gradient
        new, old = ([k for k, s in zip(keys, started) if s == flag] for flag in (False, True))
        if new:
            torch._foreach_copy_(local(state.momentum_buffer[k] for k in new), local(updates[k] for k in new))
        if old:
            buf = local(state.momentum_buffer[k] for k in old)
            torch._foreach_mul_(buf, decay)
            torch._foreach_add_(buf, local(updates[k] for k in old), alpha=1.0 - dampening)
        g = local(updates[k] for k in keys)
        buf = local(state.momentum_buffer[k] for k in keys)
        if nesterov:
            torch._foreach_add_(g, buf, alpha=decay)
        else:
            torch._foreach_copy_(g, buf)  # later transforms scale updates in place: never alias state
        return updates, state

    return GradientTransformation(init, update, _check_state_dict("momentum_buffer"))


# ---- parameter-dependent -----------------------------------------------------------------------


def add_decayed_weights(weight_decay: float, mask: Mask | None = None) -> GradientTransformation:
    """updates += weight_decay · params (restricted to `mask` when given)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0.")

    def check(updates, params):
        _require_params(params, "add_decayed_weights")
        check_tree(updates, params, "updates")

    def update(updates, params):
        keys = list(updates)
        torch._foreach_add_(local(updates[k] for k in keys), local(params[k] for k in keys), alpha=weight_decay)
        return updates

    transform = stateless(update, lambda updates, state, params=None: check(updates, params))
    return transform if mask is None else masked(transform, mask)


def scale_by_trust_ratio(trust_coefficient: float = 1.0, eps: float = 0.0) -> GradientTransformation:
    """Layer-wise trust ratio of LARS / LAMB: updates · c·‖p‖ / (‖u‖ + eps), 1 where a norm is 0."""

    def check(updates, state, params=None):
        _require_params(params, "scale_by_trust_ratio")
        check_tree(updates, params, "updates")

    def update(updates, params):
        keys = list(updates)
        u = [updates[k] for k in keys]
        # both lists in one call: on sharded parameters that is one all_reduce, not two
        both = norms([params[k] for k in keys] + u)
        p_norm, u_norm = torch.stack(both[: len(keys)]), torch.stack(both[len(keys) :])
        ratio = torch.where((p_norm > 0) & (u_norm > 0), trust_coefficient * p_norm / (u_norm + eps), 1.0)
        torch._foreach_mul_(local(u), list(ratio.to(u[0].dtype).unbind()))
        return updates

    return stateless(update, check)


# ---- clipping --------------------------------------------------------------------------------


@register_state
class ClipByGlobalNormState(NamedTuple):
    global_norm: torch.Tensor  # norm of the last step's updates before clipping (on device)


def clip_by_global_norm(max_norm: float, norm_type: float = 2.0) -> GradientTransformation:
    """Scale updates by min(1, max_norm / (‖updates‖ + 1e-6)): torch's `clip_grad_norm_`.

    Like torch it always multiplies (no host sync to test the norm); non-finite norms propagate.
    On sharded updates the norm is over all shards (one all_reduce), the same on every process.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm} must be > 0.")

    def init(params):
        device = next(iter(params.values())).device if params else None
        return ClipByGlobalNormState(torch.zeros((), device=device))

    def update(updates, state, params=None):
        u = list(updates.values())
        if not u:
            return updates, state
        total = torch.linalg.vector_norm(torch.stack(norms(u, norm_type)), norm_type)
        torch._foreach_mul_(local(u), torch.clamp(max_norm / (total + 1e-6), max=1.0))
        state.global_norm.copy_(total)
        return updates, state

    return GradientTransformation(init, update)


# ---- parameter groups --------------------------------------------------------------------------


@register_state
class MaskedState(NamedTuple):
    inner: object


def _resolve(spec, params, who: str) -> Mapping:
    if callable(spec):
        _require_params(params, who)
        return spec(params)
    return spec


def _subset(tree, keys):
    return None if tree is None else {k: tree[k] for k in keys}


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply `inner` only where `mask` is True; other updates pass through unchanged."""

    def selected(updates, params):
        m = _resolve(mask, params, "masked (callable mask)")
        if (params is not None and m.keys() != params.keys()) or not updates.keys() <= m.keys():
            every = updates.keys() | (params or {}).keys()
            raise ValueError(
                f"mask keys differ from the parameters: missing {sorted(every - m.keys())[:5]}, "
                f"unexpected {sorted(m.keys() - every)[:5]}; give one boolean per parameter."
            )
        return [k for k in updates if m[k]]

    def init(params):
        return MaskedState(inner.init(_subset(params, selected(params, params))))

    def check(updates, state, params=None):
        if inner.check is not None:
            keys = selected(updates, params)
            inner.check(_subset(updates, keys), state.inner, _subset(params, keys))

    def update(updates, state, params=None):
        keys = selected(updates, params)
        new, inner_state = inner.update(_subset(updates, keys), state.inner, _subset(params, keys))
        return {k: new.get(k, u) for k, u in updates.items()}, MaskedState(inner_state)

    return GradientTransformation(init, update, check)


@register_state
class MultiTransformState(NamedTuple):
    inner: dict[str, object]


def multi_transform(
    transforms: Mapping[str, GradientTransformation],
    param_labels: Mapping[str, str] | Callable[[Params], Mapping[str, str]],
) -> GradientTransformation:
    """Parameter groups: each parameter is updated by the transform of its label."""

    def groups(tree, params):
        labels = _resolve(param_labels, params, "multi_transform (callable labels)")
        if not tree.keys() <= labels.keys():
            raise ValueError(
                f"param_labels keys differ from the parameters: missing "
                f"{sorted(tree.keys() - labels.keys())[:5]}; label every parameter."
            )
        unknown = set(labels.values()) - transforms.keys()
        if unknown:
            raise ValueError(f"param_labels use labels {sorted(unknown)} with no transform; have {sorted(transforms)}.")
        return {label: [k for k in tree if labels[k] == label] for label in transforms}

    def init(params):
        return MultiTransformState(
            {label: transforms[label].init(_subset(params, keys)) for label, keys in groups(params, params).items()}
        )

    def check(updates, state, params=None):
        for label, keys in groups(updates, params).items():
            if transforms[label].check is not None:
                transforms[label].check(_subset(updates, keys), state.inner[label], _subset(params, keys))

    def update(updates, state, params=None):
        out, inner = dict(updates), {}
        for label, keys in groups(updates, params).items():
            new, inner[label] = transforms[label].update(
                _subset(updates, keys), state.inner[label], _subset(params, keys)
            )
            out.update(new)
        return out, MultiTransformState(inner)

    return GradientTransformation(init, update, check)


# layers whose weight is a matrix mapping features to features: the weights weight decay is for
DECAYED_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)  # fmt: skip


def default_weight_decay_mask(model: nn.Module) -> dict[str, bool]:
    """Weight decay by module type: True for the weights of linear and convolution layers,
    False for everything else -- biases, normalisation gains, embedding tables (also when tied
    to an output layer), LayerScale gains, and position tables, class tokens or learned scalars
    held directly as parameters. Keys are `model.named_parameters()`'s names."""
    layers = [m for m in model.modules() if isinstance(m, DECAYED_LAYERS)]
    embeddings = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    decayed = {id(m.weight) for m in layers} - {id(p) for m in embeddings for p in m.parameters()}
    return {name: id(p) in decayed for name, p in model.named_parameters()}
