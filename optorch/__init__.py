"""optorch: functional optimizers for PyTorch (optax style).

opt = optorch.adamw(learning_rate=3e-4, weight_decay=0.05)
state = opt.init(params)                       # params: dict name -> tensor
updates, state = opt.update(grads, state, params)
optorch.apply_updates(params, updates)

Params may be DTensors (FSDP2's `fully_shard`): see `optorch.sharding`.
"""

from . import amp, schedules
from .alias import adam, adamw, lamb, lars, lion, sgd
from .base import (
    GradientTransformation,
    apply_updates,
    chain,
    load_state_dict,
    register_state,
    state_dict,
    state_norms,
)
from .sharding import norms
from .transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    default_weight_decay_mask,
    identity,
    masked,
    multi_transform,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_schedule,
    scale_by_trust_ratio,
    trace,
)

__all__ = [
    "GradientTransformation",
    "chain",
    "apply_updates",
    "state_dict",
    "load_state_dict",
    "state_norms",
    "norms",
    "register_state",
    "identity",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
    "add_decayed_weights",
    "scale_by_trust_ratio",
    "clip_by_global_norm",
    "masked",
    "multi_transform",
    "default_weight_decay_mask",
    "sgd",
    "adam",
    "adamw",
    "lamb",
    "lars",
    "lion",
    "schedules",
    "amp",
]
