"""Local Lipschitz estimates of the attention layers, at evaluation.

The sigmoid-attention paper bounds the local Lipschitz constant of sigmoid attention by a
quantity that grows with the *mean* squared norm of the input tokens, where softmax attention's
worst-case bound depends on the *largest* one. This module measures the left-hand side on real
inputs:
for every attention layer (each `attention.Attention` in the model's blocks) the spectral norm
‖J‖₂ of the Jacobian of x -> attn(x, ...) at the layer's actual input, next to the bound's two
ingredients, the mean and the max squared token norm of that input.

How, on the first evaluation batch:
- Its first `diagnostics.lipschitz_sequences` sequences run through the task's evaluation step
  once more, with a forward pre-hook (`with_kwargs`) on every attention layer that keeps the
  layer's arguments as the model passed them (x, padding, context, whatever else): the estimate
  differentiates `x -> attn(x, *args, **kwargs)` with all of them passed through untouched.
- Power iteration on JᵀJ, `diagnostics.lipschitz_iters` steps of two backward passes through
  one forward graph: J·v by the double-backward trick (the gradient, with respect to u, of
  Jᵀ·u computed with `create_graph`) and Jᵀ·(J·v); the full Jacobian is never formed. Reverse
  mode only: forward-mode AD (`torch.func.jvp`) would import torch's compiler stack (~2 s at
  the first evaluation of every run) through its decompositions. ‖JᵀJ·v‖ ≤ σ² for a unit v,
  so the estimate approaches ‖J‖₂ from below.
- Per sequence: attention never mixes sequences, so J is block-diagonal over them and ‖J‖₂ is
  the largest block's norm. Each sequence keeps its own unit direction (the two backward passes
  of a step serve all of them), so each iteration converges at its own block's eigen-gap instead of
  at the gap between the near-equal top values of different sequences that joint iteration sees;
  and the bound, which is per input sequence, is checked per sequence (the ratios below).
- Padded positions (speech batches) are not inputs: the direction is zero there and J·v is
  zeroed there, so the estimate is that of the Jacobian between real positions only.
- The layer is put in eval mode with the probes off (`probes.recomputing()`): the power
  iteration's forwards are not observations. The fused backends (flash_sigmoid: a custom
  autograd Function / Triton; flash_softmax: flash-attn / SDPA) cannot be differentiated twice:
  the estimate runs the layer with the naive backend of the same activation (sigmoid / softmax),
  the same function computed with the matrix materialised.
- Its initial direction comes from a generator of its own: the run's random stream is untouched.

Keys (per attention layer, `lipschitz/block_NN/<stat>`; max-named ones are reduced across
processes by max, the mean by mean):
    spectral_max            ‖J‖₂ estimate: the max over the sequences of each one's
    sq_norm_mean            mean ‖x_i‖² over the real tokens of the sequences
    sq_norm_max             max ‖x_i‖² over them
    ratio_to_mean_sq_max    max over sequences of ‖J_s‖₂ / (mean ‖x_i‖² of sequence s)
    ratio_to_max_sq_max     max over sequences of ‖J_s‖₂ / (max ‖x_i‖² of sequence s)

Skipped (one log line) under trainer.parallel=fsdp, where a layer's parameters are shards
gathered only inside the model's own forward, and under trainer.context_parallel > 1, where each
process holds a piece of every sequence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from ..attention import Attention
from ..data.masking import first_rows
from ..probes import numbered, probe_key, recomputing

log = logging.getLogger(__name__)


def estimate(model, forward: Callable, batch: dict, iters: int, sequences: int, parallel) -> dict[str, torch.Tensor]:
    """`lipschitz/block_NN/<stat>` (0-d tensors on the device) of every attention layer, on the
    first `sequences` sequences of `batch` with `iters` power iterations; `forward(batch)` runs
    the model on a batch as evaluation does. Empty when the run is sharded."""
    if parallel.sharded or parallel.cp is not None:
        _skipped(parallel.world.is_main)
        return {}
    with captured_inputs(model) as inputs:
        forward(first_rows(batch, sequences))
    return {
        f"{key}/{name}": value
        for key, (layer, args, kwargs) in inputs.items()
        for name, value in layer_stats(layer, args, kwargs, iters).items()
    }


@functools.cache
def _skipped(is_main: bool):
    if is_main:
        log.info("diagnostics.lipschitz is skipped: under trainer.parallel=fsdp or trainer.context_parallel > 1 "
                 "no process holds a whole layer and whole sequences.")  # fmt: skip


@contextmanager
def captured_inputs(model: torch.nn.Module) -> Iterator[dict[str, tuple[Attention, tuple, dict]]]:
    """While open, the first call of each attention layer is kept: {key: (layer, args, kwargs)}."""
    inputs: dict[str, tuple[Attention, tuple, dict]] = {}

    def keep(key, layer, args, kwargs):
        inputs.setdefault(key, (layer, args, kwargs))

    handles = [
        module.register_forward_pre_hook(partial(keep, probe_key("lipschitz", block)), with_kwargs=True)
        for block, module in numbered(model, Attention)
    ]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def layer_stats(layer: Attention, args: tuple, kwargs: dict, iters: int) -> dict[str, torch.Tensor]:
    """The keys' statistics of one layer called as `layer(*args, **kwargs)`, x = args[0] (S, T, C);
    padded positions are those of kwargs["padding"] (how the blocks pass it)."""
    x = args[0].detach().to(next(layer.parameters()).dtype)  # (S, T, C)
    padding = kwargs.get("padding")
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.real  # (S, T)
    with differentiable(layer):
        sigma = spectral_norms(lambda x: layer(x, *args[1:], **kwargs), x, real[..., None], iters)  # (S,)
    squares = x.square().sum(-1) * real  # (S, T): ‖x_i‖², 0 at padded positions
    mean_sq = squares.sum(1) / real.sum(1)  # (S,)
    max_sq = squares.amax(1)  # (S,)
    return {
        "spectral_max": sigma.max(),
        "sq_norm_mean": squares.sum() / real.sum(),
        "sq_norm_max": max_sq.max(),
        "ratio_to_mean_sq_max": (sigma / mean_sq).max(),
        "ratio_to_max_sq_max": (sigma / max_sq).max(),
    }


@contextmanager
def differentiable(layer: Attention):
    """The layer in eval mode, with its backend's naive twin (flash_sigmoid -> sigmoid, ...), its
    probes off."""
    training = layer.training
    layer.eval()
    try:
        with recomputing(), layer.using_backend(layer.described.reference):
            yield
    finally:
        layer.train(training)


def spectral_norms(fn: Callable, x: torch.Tensor, real: torch.Tensor, iters: int) -> torch.Tensor:
    """Per sequence s, a power-iteration estimate of ‖J_s‖₂, J_s the Jacobian of fn's output rows
    at the real positions of sequence s with respect to its input rows there: x (S, T, C), real
    (S, T, 1) bool -> (S,). fn must not mix sequences (J block-diagonal)."""
    real = real.to(x.dtype)
    generator = torch.Generator(device=x.device).manual_seed(0)
    v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * real  # (S, T, C)
    v = v / v.flatten(1).norm(dim=1)[:, None, None]
    with torch.enable_grad():  # (evaluation runs without)
        x = x.detach().requires_grad_()
        y = fn(x)  # one forward: both products below differentiate this graph
        u = torch.zeros_like(y, requires_grad=True)
        (pulled,) = torch.autograd.grad(y, x, u, create_graph=True)  # Jᵀ·u, linear in u
        for _ in range(iters):  # iters >= 1
            (jv,) = torch.autograd.grad(pulled, u, v, retain_graph=True)  # J·v (S, T, C): d(Jᵀ·u)/du = J
            (w,) = torch.autograd.grad(y, x, jv * real, retain_graph=True)  # Jᵀ·J·v
            w = w * real
            sigma_sq = w.flatten(1).norm(dim=1)  # (S,): ‖JᵀJ·v‖ ≤ σ², equal once v is the top singular vector
            v = w / sigma_sq.clamp(min=torch.finfo(x.dtype).tiny)[:, None, None]
    return sigma_sq.sqrt()
