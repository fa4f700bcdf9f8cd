"""The recorder behind the probes, plus parameter and optimizer-state statistics.

Keys are grouped by prefix so W&B shows them as sections:
    attn/block_03/mass_mean      attn_out/block_03/norm_mean     resid/block_03/grad_norm_max
    param/blocks.3.attn.qkv.weight   grad/...   update/...   update_ratio/...   opt/exp_avg_sq/...
    lipschitz/block_03/spectral_max  (at evaluation: lipschitz.py)
Everything recorded in a step stays on the device as 0-d tensors until `pop`, which the
trainer stacks with its own metrics into one device -> host transfer. Nothing is kept across
steps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

import optorch

from ..errors import ConfigError
from ..probes import Probe, numbered, probe_key
from . import lipschitz

KINDS = ("attn", "attn_v", "attn_out", "mlp_out", "resid", "logits")


@dataclass
class DiagnosticsConfig:
    """What to watch and how often (the `diagnostics/` config group).

    every_n_steps: record on every n-th training step (0: off).
    probes: which activations: attn (attention mass, entropy for softmax), attn_v (attention·V),
        attn_out (after the output projection), mlp_out, resid (residual stream after each
        block), logits.
    gradients: also the norms of the gradient flowing back through each probe.
    parameters: per-parameter norms, gradient norms, update norms and update/parameter ratios.
    optimizer_state: norms of every optimizer-state buffer per parameter (optorch.state_norms).
    at_eval: also the forward statistics of the first evaluation batch (as eval_<stat>).
    lipschitz: at every evaluation, a power-iteration estimate of each attention layer's
        input -> output Jacobian norm on the first evaluation batch, with the mean and max
        squared token norms of its input (lipschitz/block_NN/..., diagnostics/lipschitz.py). Off
        here, on in the `default` and `full` presets.
    lipschitz_iters: power iterations (two backward passes each) per estimate.
    lipschitz_sequences: how many sequences of that batch the estimate uses (the cost grows with it).
    """

    every_n_steps: int = 10
    probes: list[str] = field(default_factory=lambda: ["attn", "resid"])
    gradients: bool = False
    parameters: bool = False
    optimizer_state: bool = False
    at_eval: bool = True
    lipschitz: bool = False
    lipschitz_iters: int = 20
    lipschitz_sequences: int = 4

    def __post_init__(self):
        unknown = set(self.probes) - set(KINDS)
        if unknown:
            raise ConfigError(f"diagnostics.probes has unknown kinds {sorted(unknown)}; choose from {list(KINDS)}.")
        if self.every_n_steps < 0:
            raise ConfigError(f"diagnostics.every_n_steps={self.every_n_steps} must be >= 0 (0 = off).")
        for name in ("lipschitz_iters", "lipschitz_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"diagnostics.{name}={getattr(self, name)} must be >= 1 (diagnostics.lipschitz=false "
                                  "turns the estimate off).")  # fmt: skip


class Diagnostics:
    """Attach to a model's probes; record while `recording()` is open on a due step."""

    def __init__(self, config: DiagnosticsConfig, model: nn.Module):
        self.config = config
        self.active, self.gradients, self.suffix = False, False, ""
        self.grad_unscale: torch.Tensor | float = 1.0  # 1 / the fp16 loss scale: gradients are recorded unscaled
        self.records: dict[str, torch.Tensor] = {}
        for block, module in numbered(model, Probe):
            module.key = probe_key(module.kind, block)
            module.recorder = self if config.every_n_steps and module.kind in config.probes else None

    def due(self, step: int) -> bool:
        every = self.config.every_n_steps
        return every > 0 and step % every == 0

    @contextmanager
    def recording(self, on: bool = True, eval: bool = False):
        """Probes record inside this block when `on`; eval records forward statistics only."""
        self.active = on and (not eval or self.config.at_eval)
        self.gradients = self.active and self.config.gradients and not eval
        self.suffix = "eval_" if eval else ""
        try:
            yield self.active
        finally:
            self.active = self.gradients = False

    def record(self, key: str, stats: dict[str, torch.Tensor]):
        for name, value in stats.items():
            self.records[f"{key}/{self.suffix}{name}"] = value

    def record_grad(self, key: str, stats: dict[str, torch.Tensor]):
        """Statistics of a gradient seen by a probe's hook: norms are linear in the loss scale."""
        self.record(key, {name: value * self.grad_unscale for name, value in stats.items()})

    @torch.no_grad()
    def record_gradients(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]):
        """Parameter and gradient norms of the parameters that have gradients: call after
        unscaling, before the optimizer consumes them."""
        if self.active and self.config.parameters:
            names = list(grads)
            self._per_parameter("param", names, [params[k] for k in names])
            self._per_parameter("grad", names, [grads[k] for k in names])

    @torch.no_grad()
    def record_update(self, updates: dict[str, torch.Tensor], opt_state):
        """Update norms, update/parameter ratios and optimizer-state norms, before applying."""
        if self.active and self.config.parameters:
            names = list(updates)
            for name, norm in zip(names, self._per_parameter("update", names, [updates[k] for k in names])):
                self.records[f"update_ratio/{name}"] = norm / self.records[f"param/{name}"].clamp(min=1e-12)
        if self.active and self.config.optimizer_state:
            self.records.update({f"opt/{k}": v for k, v in optorch.state_norms(opt_state).items()})

    def _per_parameter(self, prefix: str, names: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        norms = optorch.norms(tensors)  # of whole parameters also when sharded (FSDP2): one all_reduce
        self.records.update({f"{prefix}/{name}": norm for name, norm in zip(names, norms)})
        return norms

    def evaluation_batch(self, model: nn.Module, forward: Callable, batch: dict, parallel):
        """The hook the trainer calls with each evaluation's first batch (`forward(batch)` runs
        the model on a batch as evaluation does): the attention layers' Jacobian norms on it
        (diagnostics.lipschitz), popped with the probes' statistics."""
        if self.config.lipschitz:
            config = self.config
            self.records.update(lipschitz.estimate(model, forward, batch, config.lipschitz_iters,
                                                   config.lipschitz_sequences, parallel))  # fmt: skip

    def pop(self) -> dict[str, torch.Tensor]:
        records, self.records = self.records, {}
        return records
