"""Core of optorch: gradient transformations, `chain`, `apply_updates` and state-tree helpers.

Params, grads, updates and per-parameter state are dicts keyed by parameter name. `grads`
may hold a subset of the parameters: one without a gradient this step is left untouched, and so
is its state (as torch.optim skips a parameter whose `.grad` is None). A
transformation's `update` may overwrite the `updates` it is given (as `clip_grad_norm_` and
torchopt's `inplace=True` do) and mutates its state in place: that keeps an AdamW step free of
allocations, which on CPU is the difference between matching `torch.optim` and being 30 % slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .sharding import copy_like, local, norms

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
State = Any  # a NamedTuple (or tuple) whose leaves are tensors or dicts of tensors
InitFn = Callable[[Params], State]
UpdateFn = Callable[[Updates, State, "Params | None"], "tuple[Updates, State]"]
CheckFn = Callable[[Updates, State, "Params | None"], None]


class GradientTransformation(NamedTuple):
    """An `(init, update)` pair, optax style, plus an optional `check`.

    `check(updates, state, params)` raises `ValueError` on bad input and changes nothing;
    `chain` runs every check before any `update`, so a failing step leaves params and state
    untouched. `update` itself does not validate (it is the hot path).
    """

    init: InitFn
    update: UpdateFn
    check: CheckFn | None = None


def register_state(cls):
    """Class decorator: lets `torch.load(weights_only=True)` rebuild this state NamedTuple."""
    torch.serialization.add_safe_globals([cls])
    return cls


class EmptyState(NamedTuple):
    pass


register_state(EmptyState)


def stateless(update: Callable[[Updates, Params | None], Updates], check: CheckFn | None = None):
    """A transformation without state from `update(updates, params) -> updates`."""
    return GradientTransformation(
        init=lambda params: EmptyState(),
        update=lambda updates, state, params=None: (update(updates, params), state),
        check=check,
    )


def check_tree(tree: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str):
    """Raise ValueError unless `tree`'s keys are among `reference`'s (a missing key is a
    parameter without a gradient) with the same shapes."""
    extra = sorted(tree.keys() - reference.keys())
    if extra:
        raise ValueError(
            f"{what} do not match the optimizer state: unexpected {extra[:5]}. Pass a dict keyed by the "
            "parameters the optimizer was initialised with (re-run opt.init(params) after changing the model)."
        )
    for name, value in tree.items():
        ref = reference[name]
        if value.shape != ref.shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(value.shape)} but the optimizer state "
                f"expects {tuple(ref.shape)}; re-run opt.init(params) after changing the model."
            )


def check_finite(value: float, what: str, step: int) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value} at step {step}; it must be a finite number.")
    return value


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in sequence; the state is a tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def check(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transformations got a state with {len(state)} "
                "entries; the state comes from a different optimizer."
            )
        for t, s in zip(transforms, state):
            if t.check is not None:
                t.check(updates, s, params)

    @torch.no_grad()
    def update(updates, state, params=None):
        check(updates, state, params)
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update, check)


@torch.no_grad()
def apply_updates(params: Params, updates: Updates) -> None:
    """`params[k] += updates[k]` in place for every key of `updates` (one foreach kernel per
    dtype/device, on the local shards of DTensors); parameters without an update stay as they are."""
    check_tree(updates, params, "updates")
    keys = list(updates)
    torch._foreach_add_(local(params[k] for k in keys), local(updates[k] for k in keys))


# ---- state trees: checkpointing and statistics -------------------------------------------


def state_dict(state: State) -> Any:
    """The state as plain dicts / lists of tensors (what `torch.save` stores most portably)."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {f: state_dict(getattr(state, f)) for f in state._fields}
    if isinstance(state, tuple):
        return [state_dict(s) for s in state]
    if isinstance(state, dict):
        return {k: state_dict(v) for k, v in state.items()}
    return state


def load_state_dict(template: State, saved: Any, path: str = "state") -> State:
    """Rebuild a state shaped like `template` (from `opt.init(params)`) with `saved`'s values.

    Tensors are copied onto the template's device and dtype, so a checkpoint written on one
    device resumes on another; a DTensor in the template takes a DTensor of the same sharding
    (what torch.distributed.checkpoint loads). Any structural difference raises ValueError naming
    its path.
    """
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        saved = _expect(saved, dict, path)
        if set(saved) != set(template._fields):
            raise ValueError(f"{path}: saved fields {sorted(saved)} != {list(template._fields)}")
        return type(template)(
            *(load_state_dict(getattr(template, f), saved[f], f"{path}.{f}") for f in template._fields)
        )
    if isinstance(template, tuple):
        saved = _expect(saved, (list, tuple), path)
        if len(saved) != len(template):
            raise ValueError(f"{path}: saved {len(saved)} entries, expected {len(template)}")
        return tuple(load_state_dict(t, s, f"{path}[{i}]") for i, (t, s) in enumerate(zip(template, saved)))
    if isinstance(template, dict):
        saved = _expect(saved, dict, path)
        if saved.keys() != template.keys():
            raise ValueError(
                f"{path}: saved keys differ from the model's: missing "
                f"{sorted(template.keys() - saved.keys())[:5]}, unexpected "
                f"{sorted(saved.keys() - template.keys())[:5]}"
            )
        return {k: load_state_dict(template[k], saved[k], f"{path}[{k!r}]") for k in template}
    if isinstance(template, torch.Tensor):
        saved = _expect(saved, torch.Tensor, path)
        if saved.shape != template.shape:
            raise ValueError(f"{path}: saved shape {tuple(saved.shape)}, expected {tuple(template.shape)}")
        return copy_like(saved, template, path)
    return saved


def _expect(value, types, path):
    if not isinstance(value, types):
        raise ValueError(f"{path}: saved value is a {type(value).__name__}, expected {types}")
    return value


def state_norms(state: State) -> dict[str, torch.Tensor]:
    """L2 norm of every per-parameter state buffer, as `{"exp_avg/<param>": 0-d tensor}`.

    The norms stay on the buffers' device (no host sync); the diagnostics stack and transfer
    them together with everything else they log. Sharded buffers give whole-buffer norms (one
    all_reduce for the whole state).
    """
    buffers: dict[str, torch.Tensor] = {}
    for field, named in _named_buffers(state):
        floats = {k: t for k, t in named.items() if t.is_floating_point()}
        if not floats:
            continue
        key = field
        while any(k.startswith(key + "/") for k in buffers):  # same field twice, e.g. two traces
            key += "_"
        buffers.update({f"{key}/{name}": t for name, t in floats.items()})
    return dict(zip(buffers, norms(buffers.values())))


def _named_buffers(state):
    """Yield (field name, dict of tensors) for every per-parameter dict in a state tree."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        for f in state._fields:
            value = getattr(state, f)
            if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
                yield f, value
            else:
                yield from _named_buffers(value)
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _named_buffers(s)
    elif isinstance(state, dict):
        for s in state.values():
            yield from _named_buffers(s)
