"""Probes: identity modules placed where activations are worth watching (diagnostics/ records them).

A probe does nothing unless a recorder (`Diagnostics`) is attached and recording; then it
reduces its input -- and, through a tensor hook, the gradient flowing back through it -- to a
few 0-d tensors on the input's device. Reductions are masked (no boolean indexing), so
recording never waits for the device; the recorder moves everything to the host at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import torch
from torch import nn


class Padding(Protocol):
    """What a probe needs of a right-padded batch (`attention.masks.Padding` is one)."""

    real: torch.Tensor  # (B, T) bool: True at real positions


class Pairs(Protocol):
    """What `AttentionProbe.record_scores` needs of an attention call (`AttentionSpec` is one)."""

    scale: float
    q_padding: Padding | None

    def attended(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B|1, 1, Tq, Tk) bool: the pairs that attend, padded queries excluded."""

    def row_weights(self, q: torch.Tensor, k: torch.Tensor, activation: str, rows: int = 256):
        """(rows slice, the scores q·kᵀ·scale and the weights (B, H, rows, Tk) of those query rows),
        a few rows at a time."""


_recomputing = 0  # > 0 while activation checkpointing recomputes a forward during backward


@contextmanager
def recomputing():
    """Probes are off inside: a recomputed forward is not a new observation. (A module flag,
    not a context variable: autograd may recompute on its own device thread.)"""
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def _valid_rows(padding: Padding | None) -> torch.Tensor | None:
    """(B, T) True at real rows of a right-padded batch, or None when nothing is padded."""
    return None if padding is None else padding.real


def _masked_stats(values: torch.Tensor, valid: torch.Tensor | None, prefix: str) -> dict[str, torch.Tensor]:
    """mean / max / min of `values` over valid entries (valid broadcasts against values)."""
    if valid is None:
        low, high = torch.aminmax(values)
        return {f"{prefix}_mean": values.mean(), f"{prefix}_max": high, f"{prefix}_min": low}
    valid = valid.expand_as(values)
    count = valid.sum().clamp(min=1)
    return {
        f"{prefix}_mean": (values * valid).sum() / count,
        f"{prefix}_max": values.masked_fill(~valid, float("-inf")).amax(),
        f"{prefix}_min": values.masked_fill(~valid, float("inf")).amin(),
    }


def token_stats(x: torch.Tensor, padding: Padding | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Norms of each token's vector: x (B, T, ...) or (B, C) -> norm mean / max / min and RMS."""
    x = x.detach().float()
    rows = x.flatten(2) if x.ndim >= 3 else x[:, None]  # (B, T, F)
    norms = rows.norm(dim=-1)  # (B, T)
    valid = _valid_rows(padding)
    stats = _masked_stats(norms, valid, f"{prefix}norm")
    squares = norms.square() if valid is None else norms.square() * valid
    count = norms.numel() if valid is None else valid.sum().clamp(min=1)
    stats[f"{prefix}rms"] = (squares.sum() / (count * rows.shape[-1])).sqrt()
    return stats


def residual_stats(x: torch.Tensor, padding: Padding | None = None) -> dict[str, torch.Tensor]:
    """`token_stats`, and the outliers among the activations x (B, T, C) of real tokens:
    `massive`, the largest |x| over the median |x| (Sun et al. 2024's massive activations), and
    `kurtosis`, E[(x − mean)⁴] / var² (3 for a Gaussian)."""
    stats = token_stats(x, padding)
    x = x.detach().float()
    valid = torch.ones_like(x[..., :1]) if padding is None else padding.real[..., None].float()  # (B, T, 1)
    magnitude = x.abs().masked_fill(valid == 0, float("nan"))
    stats["massive"] = magnitude.nan_to_num(0.0).amax() / magnitude.nanmedian().clamp(min=1e-30)
    count = valid.sum() * x.shape[-1]
    mean = (x * valid).sum() / count
    centred = (x - mean) * valid
    stats["kurtosis"] = (centred**4).sum() / count / ((centred**2).sum() / count).square().clamp(min=1e-30)
    return stats


def attention_stats(
    weights: torch.Tensor, padding: Padding | None = None, entropy: bool = False
) -> dict[str, torch.Tensor]:
    """Row mass Σ_j p_ij (mean / max / min) of weights (B, H, Tq, Tk) -- or of a mass (B, H, Tq)
    from a fused kernel -- and, for softmax, the mean row entropy."""
    weights = weights.detach().float()
    mass = weights.sum(-1) if weights.ndim == 4 else weights  # (B, H, Tq)
    valid = _valid_rows(padding)
    valid = None if valid is None else valid[:, None, :]  # (B, 1, Tq)
    stats = _masked_stats(mass, valid, "mass")
    if entropy and weights.ndim == 4:
        row_entropy = -(weights * weights.clamp(min=1e-30).log()).sum(-1)
        stats["entropy_mean"] = _masked_stats(row_entropy, valid, "entropy")["entropy_mean"]
    return stats


SINK_EPSILON = 0.3  # a head is a sink head when its mean share on the first key exceeds this (Gu et al.)

BLOCK = re.compile(r"^(.*?blocks\.\d+)(\.|$)")


def numbered(model: nn.Module, of_type: type) -> Iterator[tuple[int | None, nn.Module]]:
    """(block number, module) for each module of `of_type`: the number of the block (a
    `blocks.N` child) it sits in, counted across the whole model in module order -- an MAE's
    decoder blocks follow its encoder's -- or None outside every block (the logits' probe)."""
    numbers: dict[str, int] = {}
    for path, module in model.named_modules():
        match = BLOCK.match(path)
        if match:
            numbers.setdefault(match.group(1), len(numbers))
        if isinstance(module, of_type):
            yield (numbers[match.group(1)] if match else None), module


def probe_key(kind: str, block: int | None) -> str:
    """'resid', 3 -> 'resid/block_03'; outside the blocks, the kind alone."""
    return kind if block is None else f"{kind}/block_{block:02d}"


class Probe(nn.Module):
    """Identity on x (B, T, ...) that records `token_stats` of x and of its gradient.

    Place one where a tensor is worth watching (`self.resid_probe = Probe("resid")`, then
    `x = self.resid_probe(x, padding)`); `kind` must be one of `diagnostics.KINDS` for
    `diagnostics.probes` to switch it on. `Diagnostics` keys it by the block it sits in
    (`resid/block_03/...`). A subclass changes what is recorded by overriding `stats`: a
    function of (x, padding) returning 0-d tensors on the device (no host sync; names ending
    `_max` / `_min` are reduced across processes by max / min, the rest by mean)."""

    stats = staticmethod(token_stats)

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.key: str = kind
        self.recorder = None  # set by Diagnostics.attach

    @property
    def active(self) -> bool:
        return self.recorder is not None and self.recorder.active and not _recomputing

    def forward(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        if not self.active:
            return x
        self.recorder.record(self.key, self.stats(x, padding))
        if self.recorder.gradients and x.requires_grad:
            x.register_hook(partial(self._record_grad, padding))
        return x

    def _record_grad(self, padding, grad):
        self.recorder.record_grad(self.key, token_stats(grad, padding, prefix="grad_"))


class ResidualProbe(Probe):
    """A `Probe` of the residual stream: `token_stats` and its outliers (`residual_stats`)."""

    stats = staticmethod(residual_stats)


class AttentionProbe(Probe):
    """Records attention mass (and entropy for softmax) of the weights matrix; fused sigmoid
    backends hand it the per-row mass via `record_mass` instead. Its gradient statistics are
    the norms of each row of dL/dP."""

    def __init__(self, kind: str, entropy: bool):
        super().__init__(kind)
        self.stats = partial(attention_stats, entropy=entropy)

    def record_mass(self, mass: torch.Tensor, padding: Padding | None = None):
        self.recorder.record(self.key, attention_stats(mass, padding))

    @torch.no_grad()
    def record_scores(self, q: torch.Tensor, k: torch.Tensor, pairs: Pairs, activation: str, rows: int = 256):
        """Whatever the backend, from q (B, Tq, H, D) and k (B, Tk, Hk, D), `rows` queries at a time:
        - `logit_max`: the largest attention logit q·kᵀ·scale over the pairs attended (no bias, no
          ALiBi). Its growth is the instability QK-norm prevents (Wortsman et al. 2023);
        - `sink_mass`: the share of each row's attention on the first key of its sequence (the
          row's weights normalised to sum 1, as Gu et al. 2024 do for unnormalised attention), mean
          over heads and real rows; `sink_heads`: the fraction of heads whose mean share exceeds
          0.3 -- Gu et al.'s Sink₁^ε, ε = 0.3 (per process; averaged across processes)."""
        allowed = pairs.attended(q, k)  # (B|1, 1, Tq, Tk)
        highest = torch.tensor(float("-inf"), device=q.device)
        shares = []
        for part, scores, weights in pairs.row_weights(q, k, activation, rows):  # (B, H, rows, Tk) each
            highest = torch.maximum(highest, scores.masked_fill(~allowed[..., part, :], float("-inf")).amax())
            shares.append(weights[..., 0] / weights.sum(-1).clamp(min=1e-30))  # (B, H, rows)
        share = torch.cat(shares, -1)  # (B, H, Tq)
        valid = torch.ones_like(share[:, :1]) if pairs.q_padding is None else pairs.q_padding.real[:, None].float()
        per_head = (share * valid).sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)  # (H,)
        self.recorder.record(self.key, {"logit_max": highest, "sink_mass": per_head.mean(),
                                        "sink_heads": (per_head > SINK_EPSILON).float().mean()})  # fmt: skip

    def _record_grad(self, padding, grad):
        norms = grad.detach().float().norm(dim=-1)  # (B, H, Tq): one per row of dL/dP
        valid = _valid_rows(padding)
        self.recorder.record_grad(
            self.key, _masked_stats(norms, None if valid is None else valid[:, None], "grad_norm")
        )
