"""Context parallelism: exact ring attention over a sequence split across processes.

Layout ("zig-zag", for load balance): a sequence of T tokens is cut into 2·P equal chunks for a
group of P processes; rank r holds chunks r and 2P − 1 − r, concatenated in that order. Under a
causal mask every rank then has the same work: each holds one early and one late chunk.

The ring: every rank keeps its queries and passes its keys and values to the next rank, P − 1
times, attending its queries to the block it holds while the next transfer is in flight. Pairs
of (query chunk a, key chunk b) are full blocks when a > b, causal (diagonal) blocks when
a == b and skipped when a < b (everything is full without a causal mask). In the zig-zag layout
that is: the rank's own block is ordinary causal attention; a block from an earlier rank is
seen by all queries through its first chunk only; a block from a later rank is seen by the
second query chunk only. Masks, ALiBi distances and the sigmoid bias −log n use GLOBAL
positions and lengths.

Merging the per-block partials is exact:
- sigmoid: attention over a union of key blocks is the sum of the attention over each block
  (no normaliser, no running max): out = Σ_j out_j, and the row mass likewise.
- softmax: out_j is normalised over block j with log-sum-exp lse_j; the blocks merge by
  lse = logaddexp(lse, lse_j), out = out·exp(lse_old − lse) + out_j·exp(lse_j − lse). A sink
  logit s (per head) is one more block, with lse_j = s and out_j = 0 (it has no value).

The backward recomputes each block and differentiates it with autograd. Block j's share of the
output is out_j (sigmoid) or exp(lse_j − lse)·out_j with the final lse held constant (softmax);
the softmax normaliser's own gradient adds −Σ_rows exp(lse_j − lse)·D, D = rowsum(dO ⊙ O), as
in FlashAttention-2's backward; that term is all a sink's gradient has: −Σ_rows exp(s − lse)·D.
dq accumulates locally; dk/dv accumulators travel around the ring with the key/value blocks and
arrive back at the rank that owns them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from einops import rearrange

import flash_sigmoid
from flash_sigmoid.reference import allowed_and_alibi, attention_logits, weighted_values

from ..errors import ConfigError
from .backends import BACKENDS, AttentionSpec, Backend
from .ops import at_least_fp32

if TYPE_CHECKING:
    from .config import AttentionConfig


def _zigzag_positions(rank: int, size: int, local_len: int, device=None) -> torch.Tensor:
    """(local_len,) global positions of rank `rank`'s tokens: chunks rank and 2·size − 1 − rank."""
    if local_len % 2:
        raise ValueError(f"a context-parallel shard holds two equal chunks; got {local_len} tokens (odd).")
    c = local_len // 2
    late = 2 * size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(late * c, (late + 1) * c, device=device)])  # fmt: skip


@dataclass(frozen=True)
class ContextParallel:
    """The processes that hold pieces of the same sequences, and this process's place among them."""

    group: dist.ProcessGroup | None  # None: the default group
    rank: int  # this process's index in the group
    size: int

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """(local_len,) int64 global positions of this rank's tokens."""
        return _zigzag_positions(self.rank, self.size, local_len, device)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's piece of a full-sequence tensor: chunks rank and 2·size − 1 − rank along `dim`."""
        if x.shape[dim] % (2 * self.size):
            raise ValueError(f"context parallelism over {self.size} processes needs a sequence length divisible by "
                             f"{2 * self.size}; got {x.shape[dim]}.")  # fmt: skip
        chunks = x.chunk(2 * self.size, dim)
        return torch.cat([chunks[self.rank], chunks[2 * self.size - 1 - self.rank]], dim)

    def attend(self, q, k, v, spec: AttentionSpec, backend: Backend) -> torch.Tensor:
        """`ring_attention` with the per-block kernel that serves `backend` (an `Attention`
        layer's `sequence_parallel`)."""
        return ring_attention(q, k, v, spec, self, backend.activation, backend.ring_kernel)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of `split`: the full sequence from every rank's piece (an all_gather, no autograd)."""
        if self.size == 1:
            return x
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        chunks: list[torch.Tensor | None] = [None] * (2 * self.size)
        for rank, piece in enumerate(pieces):
            chunks[rank], chunks[2 * self.size - 1 - rank] = piece.chunk(2, dim)
        return torch.cat(chunks, dim)


# ---- what context parallelism cannot honour ------------------------------------------------------


def check_supported(config: AttentionConfig) -> None:
    """Raise ConfigError naming each attention option ring attention cannot reproduce exactly."""
    kernel = BACKENDS[config.backend].ring_kernel
    served = sorted(name for name, backend in BACKENDS.items() if backend.ring_kernel is not None)
    refused = [
        (kernel is None, f"backend={config.backend!r}", f"use {' or '.join(served)}"),
        (config.window is not None, f"window={config.window}", "set attention.window=null"),
        (config.attn_drop > 0, f"attn_drop={config.attn_drop}", "set attention.attn_drop=0"),
        (config.bias_n == "per_row", "bias_n=per_row", "use attention.bias_n=max_length"),
        (config.length_norm is not None, f"length_norm={config.length_norm}", "set attention.length_norm=null"),
        (kernel == "flash_sigmoid" and config.position == "alibi", f"position=alibi with {config.backend}",
         "use attention.backend=sigmoid for ALiBi, or attention.position=rope"),
    ]  # fmt: skip
    problems = [f"attention.{what} ({fix})" for bad, what, fix in refused if bad]
    if problems:
        raise ConfigError(
            "trainer.context_parallel cannot honour " + "; ".join(problems) + ". Change these options, or turn "
            "context parallelism off (trainer.context_parallel=1)."
        )


def _check_call(q, k, spec: AttentionSpec, bias) -> None:
    """Refuse (ValueError) what a spec may carry that ring attention does not compute."""
    if spec.q_padding is not None or spec.k_padding is not None:
        raise ValueError("ring attention takes unpadded batches (every sequence fills the shard); got padding.")
    if spec.kv_cache is not None:
        raise ValueError("ring attention does not decode with a KV cache.")
    if spec.window != (-1, -1) or spec.dropout_p:
        raise ValueError(f"ring attention supports no window or attention dropout; got window={spec.window}, "
                         f"dropout_p={spec.dropout_p}.")  # fmt: skip
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention is self-attention: {q.shape[1]} queries but {k.shape[1]} keys per shard.")
    if bias is not None and bias.ndim > 1:
        raise ValueError(f"ring attention takes a sigmoid bias of shape [] or [heads]; got {tuple(bias.shape)}.")


# ---- one (query rows, key block) pair --------------------------------------------------------------


@dataclass(frozen=True)
class _Ring:
    """Everything about one ring attention call except the tensors."""

    spec: AttentionSpec
    cp: ContextParallel
    activation: str  # "sigmoid" | "softmax"
    kernel: str  # "naive" | "flash_sigmoid"


@dataclass(frozen=True)
class _Step:
    """The local query rows that see the key block held from rank `source`, and which of its keys."""

    rows: slice
    cols: slice
    causal: bool  # the rank's own block: causal within it (global positions increase along it)
    q_pos: torch.Tensor  # (rows,) global positions
    k_pos: torch.Tensor  # (cols,)
    length: int  # the whole sequence's


def _step(ring: _Ring, source: int, local_len: int, device) -> _Step:
    cp, half, every = ring.cp, local_len // 2, slice(None)
    rows, cols = every, every
    if ring.spec.causal and source < cp.rank:
        cols = slice(None, half)  # an earlier rank's late chunk comes after both of ours
    elif ring.spec.causal and source > cp.rank:
        rows = slice(half, None)  # only our late chunk comes after a later rank's chunks
    causal = ring.spec.causal and source == cp.rank
    q_pos = cp.positions(local_len, device)[rows]
    k_pos = _zigzag_positions(source, cp.size, local_len, device)[cols]
    return _Step(rows, cols, causal, q_pos, k_pos, local_len * cp.size)


def _naive_block(ring: _Ring, step: _Step, q, k, v, bias):
    """The block with its (B, H, Tq, Tk) logits materialised in fp32, masks and ALiBi from global
    positions: (out (B, Tq, H, D), mass (B, H, Tq)) for sigmoid, (out, lse (B, H, Tq)) for softmax."""
    spec = ring.spec
    q, k, v = (at_least_fp32(t) for t in (q, k, v))
    slopes = None if spec.alibi_slopes is None else spec.alibi_slopes.to(q.dtype)
    allowed, alibi = allowed_and_alibi(step.q_pos, step.k_pos, 0, step.causal, (-1, -1), slopes, step.length)
    logits = attention_logits(q, k, spec.scale, bias=bias, alibi=alibi)  # (B, H, Tq, Tk)
    logits = logits.masked_fill(~allowed, float("-inf"))  # weight 0 under sigmoid and softmax
    if ring.activation == "sigmoid":
        weights = torch.sigmoid(logits)
        stat = weights.sum(-1)  # (B, H, Tq)
    else:  # every row of a block sees at least one key (see `_step`): lse is finite
        stat = torch.logsumexp(logits, dim=-1)  # (B, H, Tq)
        weights = torch.exp(logits - stat[..., None])
    return weighted_values(weights, v), stat  # (B, Tq, H, D)


def _flash_block(ring: _Ring, step: _Step, q, k, v, bias):
    """The block through FlashSigmoid: (out (B, Tq, H, D) fp32, mass (B, H, Tq))."""
    out, mass = flash_sigmoid.flash_attn_func(q, k, v, softmax_scale=ring.spec.scale, causal=step.causal,
                                              sigmoid_bias=bias, return_attn_mass=True)  # fmt: skip
    return out.float(), mass


def _block(ring: _Ring, step: _Step, q, k, v, bias):
    """Queries q (B, Tq, H, D) of the step's rows against its key block k, v (B, Tk, Hk, D)."""
    if ring.kernel == "flash_sigmoid":
        return _flash_block(ring, step, q, k, v, bias)
    device = q.device.type  # autocast would run the einsums in half precision; the merge needs fp32
    autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else None
    with autocast or contextlib.nullcontext():
        return _naive_block(ring, step, q, k, v, bias)


def _merge(ring: _Ring, out, stat, step: _Step, block_out, block_stat):
    """Fold one block's partial into the running (out (B, T, H, D), stat (B, H, T)) in place."""
    rows = step.rows
    if ring.activation == "sigmoid":
        out[:, rows] += block_out
        stat[..., rows] += block_stat
        return
    lse = torch.logaddexp(stat[..., rows], block_stat)  # (B, H, Tq)
    old = rearrange(torch.exp(stat[..., rows] - lse), "b h t -> b t h 1")
    new = rearrange(torch.exp(block_stat - lse), "b h t -> b t h 1")
    out[:, rows] = out[:, rows] * old + block_out * new
    stat[..., rows] = lse


# ---- passing blocks around the ring ------------------------------------------------------------------


class _InFlight:
    """Tensors on their way from the previous rank; `wait` returns them."""

    def __init__(self, cp: ContextParallel, tensors: list[torch.Tensor], tag: int):
        self.received = [torch.empty_like(t) for t in tensors]
        to, source = (cp.rank + 1) % cp.size, (cp.rank - 1) % cp.size
        ops = [dist.P2POp(dist.isend, t, group=cp.group, group_peer=to, tag=tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, group=cp.group, group_peer=source, tag=tag) for t in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


def _around(cp: ContextParallel, tensors: list[torch.Tensor]) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield (source rank, its tensors) for each of the ring's P steps, starting with our own; the
    next block is already in flight while the caller computes on the current one."""
    tensors = [t.contiguous() for t in tensors]
    for step in range(cp.size):
        in_flight = _InFlight(cp, tensors, tag=0) if step < cp.size - 1 else None
        yield (cp.rank - step) % cp.size, tensors
        if in_flight is not None:
            tensors = in_flight.wait()


# ---- forward and backward ------------------------------------------------------------------------------


def _ring_forward(ring: _Ring, q, k, v, bias):
    """(out (B, T, H, D) fp32, stat (B, H, T): the mass (sigmoid) or lse (softmax) over every key)."""
    batch, length, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    start = 0.0 if ring.activation == "sigmoid" else float("-inf")
    stat = torch.full((batch, heads, length), start, device=q.device)
    for source, (k_held, v_held) in _around(ring.cp, [k, v]):
        step = _step(ring, source, length, q.device)
        block_out, block_stat = _block(ring, step, q[:, step.rows], k_held[:, step.cols], v_held[:, step.cols], bias)
        _merge(ring, out, stat, step, block_out, block_stat)
    return out, stat


def _block_grads(ring: _Ring, step: _Step, q, k, v, bias, dout, stat, delta):
    """Gradients of the loss through one block's share of the output: (dq rows, dk, dv, dbias)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q[:, step.rows], k[:, step.cols], v[:, step.cols])]
        wants_bias = bias is not None and bias.requires_grad
        bias = bias.detach().requires_grad_() if wants_bias else bias
        block_out, block_stat = _block(ring, step, *leaves, bias)
        dout = dout[:, step.rows].float()
        if ring.activation == "sigmoid":
            surrogate = (block_out * dout).sum()
        else:  # the block's share exp(lse_j − lse)·out_j, and its part of the normaliser's gradient
            share = torch.exp(block_stat - stat[..., step.rows])  # (B, H, Tq)
            row_dot = torch.einsum("bthd,bthd->bht", block_out, dout)  # (B, H, Tq)
            surrogate = (share * (row_dot - delta[..., step.rows])).sum()
        grads = torch.autograd.grad(surrogate, leaves + ([bias] if wants_bias else []))
    return (*grads[:3], grads[3] if wants_bias else None)


def _ring_backward(ring: _Ring, dout, q, k, v, bias, out, stat):
    """(dq, dk, dv, dbias): dq and dbias for our queries, dk and dv for our own keys and values."""
    length = q.shape[1]
    delta = None if out is None else torch.einsum("bthd,bthd->bht", dout.float(), out)  # D = rowsum(dO ⊙ O)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dbias = None if bias is None or not bias.requires_grad else torch.zeros_like(bias, dtype=torch.float32)
    in_flight, dkv = None, None
    for source, (k_held, v_held) in _around(ring.cp, [k, v]):
        step = _step(ring, source, length, q.device)
        dq_rows, dk_block, dv_block, db = _block_grads(ring, step, q, k_held, v_held, bias, dout, stat, delta)
        dq[:, step.rows] += dq_rows
        if dbias is not None:
            dbias += db
        if in_flight is None:  # our own block comes first: its accumulators start here
            dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]
        else:  # the held block's accumulators arrived from the previous rank while we computed
            dkv = in_flight.wait()
        dkv[0][:, step.cols] += dk_block
        dkv[1][:, step.cols] += dv_block
        if ring.cp.size > 1:  # after the last step this sends each block's gradients home
            in_flight = _InFlight(ring.cp, dkv, tag=1)
    dk, dv = in_flight.wait() if in_flight is not None else dkv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype)


def _with_sink(out, stat, sink):
    """Merge the sink's block (lse_j = s, out_j = 0) into the final (out, lse): out·exp(lse − lse')."""
    lse = torch.logaddexp(stat, sink.float().reshape(1, -1, 1))  # (B, H, T)
    return out * rearrange(torch.exp(stat - lse), "b h t -> b t h 1"), lse


class _RingAttention(torch.autograd.Function):
    """(out, stat) = f(q, k, v, bias, sink); stat (mass or lse) is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sink, ring: _Ring):
        out, stat = _ring_forward(ring, q, k, v, bias)
        if sink is not None:
            out, stat = _with_sink(out, stat, sink)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, bias, sink, out if ring.activation == "softmax" else None, stat)
        ctx.mark_non_differentiable(stat)
        return out.to(q.dtype), stat

    @staticmethod
    def backward(ctx, dout, _dstat):
        q, k, v, bias, sink, out, stat = ctx.saved_tensors
        dq, dk, dv, dbias = _ring_backward(ctx.ring, dout, q, k, v, bias, out, stat)
        dsink = None
        if sink is not None and ctx.needs_input_grad[4]:  # −Σ over rows of exp(s − lse)·D, per head
            delta = torch.einsum("bthd,bthd->bht", dout.float(), out)
            dsink = -(torch.exp(sink.float().reshape(1, -1, 1) - stat) * delta).sum((0, 2)).to(sink.dtype)
        return dq, dk, dv, dbias, dsink, None


def ring_attention(q, k, v, spec: AttentionSpec, cp: ContextParallel, activation: str, kernel: str) -> torch.Tensor:
    """Exact attention of this rank's queries q (B, T, H, D) over the keys and values of every
    rank's shard (k, v (B, T, Hk, D), already RoPE-rotated at global positions) -> (B, T, H, D).

    activation: "sigmoid" | "softmax"; kernel: "naive" (softmax / sigmoid backends) or
    "flash_sigmoid". With `spec.probe` set, records each row's attention mass over the whole ring."""
    if kernel not in ("naive", "flash_sigmoid") or (kernel == "flash_sigmoid" and activation != "sigmoid"):
        raise ValueError(f"ring attention has no {kernel!r} kernel for {activation}.")
    bias = None  # for sigmoid, one type for the autograd function: a tensor [] or [H] (it may be learned)
    if activation == "sigmoid":
        b = 0.0 if spec.sigmoid_bias is None else spec.sigmoid_bias
        bias = b.float() if isinstance(b, torch.Tensor) else torch.tensor(float(b), device=q.device)
    _check_call(q, k, spec, bias)
    if kernel == "flash_sigmoid" and spec.alibi_slopes is not None:
        raise ValueError("ring attention cannot run ALiBi through flash_sigmoid; use the sigmoid backend.")
    out, stat = _RingAttention.apply(q, k, v, bias, spec.sink, _Ring(spec, cp, activation, kernel))
    if spec.probe is not None:  # the mass over the whole sequence: a softmax row's is 1 (every row attends)
        mass = stat if activation == "sigmoid" else torch.ones_like(stat)
        if spec.sink is not None:  # but for the sink's share
            mass = mass - torch.exp(spec.sink.float().reshape(1, -1, 1) - stat)
        spec.probe.record_mass(mass, None)
    return out
