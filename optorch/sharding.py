"""Sharded parameters: optorch on DTensors (FSDP2's `fully_shard`) without gathering any.

Elementwise math runs on each process's local shard (`DTensor.to_local()` shares its storage):
DTensor dispatch costs about 100 µs per tensor and foreach op on CPU, the plain op on the shard a
few. A reduction that needs whole parameters (norms, amp's overflow check) reduces the local
shards and then makes one all_reduce for the whole list, so every process gets the same result.
Plain tensors pass through untouched. Nothing here imports torch.distributed.tensor (two seconds
of import time): a DTensor can only exist once something else has imported it.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist


def _dtensor_type() -> type | None:
    """DTensor's class, or None while torch.distributed.tensor is not imported (no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each DTensor (sharing its storage, so in-place ops update the DTensor);
    plain tensors as they are."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def as_updates(results: list[torch.Tensor], updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors computed from local shards, returned as updates shaped like `updates`.

    A plain result is returned as it is. Where the update is a DTensor the result is copied into
    its local shard (a transformation may overwrite its input) and that DTensor is returned:
    one copy kernel is cheaper than wrapping each result with `DTensor.from_local` (~70 µs each).
    """
    dtensor = _dtensor_type()
    sharded = [] if dtensor is None else [i for i, u in enumerate(updates) if isinstance(u, dtensor)]
    if not sharded:
        return results
    torch._foreach_copy_([updates[i].to_local() for i in sharded], [results[i] for i in sharded])
    out = list(results)
    for i in sharded:
        out[i] = updates[i]
    return out


def _shard_groups(tensor: torch.Tensor) -> tuple:
    """The process groups over which a DTensor's elements are split (none for a plain or a
    replicated tensor)."""
    groups = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(
                "optorch got a DTensor with a Partial placement (unreduced partial sums); reduce it "
                "first (FSDP2's gradients are Shard(0) after backward)."
            )
        if placement.is_shard():
            groups.append(tensor.device_mesh.get_group(dim))
    return tuple(groups)


def _by_shard_groups(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the sharded tensors, keyed by the process groups they are split over."""
    dtensor = _dtensor_type()
    out: dict[tuple, list[int]] = {}
    if dtensor is None:
        return out
    for i, t in enumerate(tensors):
        groups = _shard_groups(t) if isinstance(t, dtensor) else ()
        if groups:
            out.setdefault(groups, []).append(i)
    return out


def norms(tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> list[torch.Tensor]:
    """The `norm_type`-norm of each whole tensor, as plain 0-d tensors (equal on every process).

    Plain tensors give `torch._foreach_norm`'s values. For DTensors each process reduces its
    local shard (sum of |x|^p, or max for the inf norm), and the partial results of every tensor
    sharded over the same process group go out in one all_reduce: no parameter is gathered.
    """
    tensors = list(tensors)
    if not tensors:
        return []
    by_groups = _by_shard_groups(tensors)
    if not by_groups:
        return list(torch._foreach_norm(tensors, norm_type))
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"norms of sharded tensors need norm_type > 0 (inf included), got {norm_type}.")
    # an empty shard holds none of the tensor: as a single zero its share is 0 (and the inf norm,
    # which has no identity, accepts it)
    shards = [s if s.numel() else s.new_zeros(1) for s in local(tensors)]
    out = list(torch._foreach_norm(shards, p))
    for groups, indices in by_groups.items():
        for i, norm in zip(indices, _all_reduce_norms([out[i] for i in indices], groups, p)):
            out[i] = norm
    return out


def _all_reduce_norms(shard_norms: list[torch.Tensor], groups: tuple, p: float) -> list[torch.Tensor]:
    """Whole-tensor norms from the norms of this process's shards: one all_reduce per group."""
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in shard_norms), torch.float32)
    partial = torch.stack([n.to(dtype) for n in shard_norms])
    op = dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM
    if op == dist.ReduceOp.SUM:
        partial.pow_(p)  # sums of |x|^p add up over the shards
    for group in groups:
        dist.all_reduce(partial, op=op, group=group)
    if op == dist.ReduceOp.SUM:
        partial.pow_(1.0 / p)
    return [total.to(n.dtype) for total, n in zip(partial.unbind(), shard_norms)]


def any_over_shards(flag: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """`flag` (a verdict on this process's shards, e.g. amp's found_inf) maxed in place over every
    process group the tensors are sharded over, so that all processes act on it alike."""
    by_groups = _by_shard_groups(list(tensors))
    for group in dict.fromkeys(g for groups in by_groups for g in groups):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def copy_like(saved: torch.Tensor, template: torch.Tensor, path: str) -> torch.Tensor:
    """A copy of `saved` on `template`'s device and dtype, sharded like `template`.

    A DTensor template takes a DTensor with the same mesh and placements, which is what
    torch.distributed.checkpoint loads into `optorch.state_dict(template)`; its local shard is
    copied, so nothing is gathered or scattered.
    """
    dtensor = _dtensor_type()
    sharded = dtensor is not None and isinstance(template, dtensor)
    if dtensor is not None and isinstance(saved, dtensor) != sharded:
        have, want = ("a DTensor", "a plain tensor") if not sharded else ("a plain tensor", "a DTensor")
        raise ValueError(
            f"{path}: saved {have} but the state holds {want}; load a sharded state with "
            "torch.distributed.checkpoint into optorch.state_dict(opt.init(params)) of the same sharding."
        )
    if not sharded:
        return saved.to(device=template.device, dtype=template.dtype, copy=True)
    if saved.device_mesh != template.device_mesh or saved.placements != template.placements:
        raise ValueError(
            f"{path}: saved DTensor is placed {saved.placements} on {saved.device_mesh}, the state "
            f"{template.placements} on {template.device_mesh}; load with the state's own sharding."
        )
    shard = saved.to_local().to(device=template.device, dtype=template.dtype, copy=True)
    mesh, placements = template.device_mesh, template.placements
    return dtensor.from_local(shard, mesh, placements, run_check=False, shape=template.shape, stride=template.stride())
