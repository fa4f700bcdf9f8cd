"""Sharded checkpoints: one `torch.distributed.checkpoint` (DCP) directory per step, written by every process.

Every process writes its own shards into `step_0000100.dcp.tmp/`; DCP's coordinator writes
`.metadata` once all shards are down. Only then does rank 0 rename the directory to
`step_0000100.dcp`, so a directory of that name is complete: a save killed half-way leaves a
`.tmp` that nothing lists and the next save removes.

DCP is given tensors only, under flat keys that spell their path in the state
(`optimizer/1/exp_avg/blocks.0.attn.qkv.weight`). Left to flatten the state itself, DCP drops
empty containers (optorch's `{}` states), turns dict keys into strings, and pickles every other
value, to be unpickled on load with `weights_only=False`. So the rest of the state -- ints, None,
tuples, strings, empty containers, with None where each tensor was (the "skeleton") -- is saved
with `torch.save` into one uint8 tensor and read back with `weights_only=True`, as single-file
checkpoints are.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor

from .errors import CheckpointError

SKELETON = ".skeleton"  # the key of the skeleton tensor; `flatten` refuses a state with a path that spells it
log = logging.getLogger(__name__)


def flatten(state: dict) -> tuple[object, dict[str, torch.Tensor]]:
    """(skeleton, tensors): the state with every tensor replaced by None, and the tensors by path key."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(value, path: tuple):
        if isinstance(value, torch.Tensor):
            key = "/".join(map(str, path))
            if key in tensors or key == SKELETON:
                raise ValueError(f"two values of the state map to the checkpoint key {key!r}")
            tensors[key] = value
            return None
        if isinstance(value, dict):
            return {k: strip(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(strip(v, (*path, i)) for i, v in enumerate(value))
        return value

    return strip(state, ()), tensors


def unflatten(skeleton, tensors: dict[str, torch.Tensor], path: tuple = ()):
    """The inverse of `flatten`: the skeleton with each tensor put back at its path."""
    key = "/".join(map(str, path))
    if path and key in tensors:
        return tensors[key]
    if isinstance(skeleton, dict):
        return {k: unflatten(v, tensors, (*path, k)) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors, (*path, i)) for i, v in enumerate(skeleton)]
    if isinstance(skeleton, tuple):
        return tuple(unflatten(v, tensors, (*path, i)) for i, v in enumerate(skeleton))
    return skeleton


def place(full: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """A full tensor as `like` holds it: its dtype and device, and for a DTensor this process's shard
    (cut locally: every process holds the full tensor, so no communication is needed)."""
    if like is None:
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def save(path: Path, state: dict) -> None:
    """Write `state` to the directory `path`; called on every process (collective) when a process
    group is initialised. Plain tensors and non-tensor values must be the same on every process:
    one copy is written (of the non-tensor values, rank 0's)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    skeleton, tensors = flatten(state)
    if rank == 0:
        tensors[SKELETON] = _encode(skeleton)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_unfinished(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    _barrier()  # no process writes into a leftover rank 0 is still removing
    with _single_process_quietly():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not dist.is_initialized())
    _barrier()  # every process's shards are on disk before the directory is published
    if rank == 0:
        _publish(tmp, path)
    _barrier()  # no process goes on (to prune, or to load it) before the checkpoint exists


def _remove_unfinished(directory: Path):
    for leftover in sorted([*directory.glob("*.dcp.tmp"), *directory.glob("*.dcp.old")]):
        log.warning(f"removing {leftover.name}: left by a checkpoint save that did not finish")
        shutil.rmtree(leftover)


def _publish(tmp: Path, path: Path):
    # a directory cannot be renamed over a non-empty one: an earlier save of this step moves aside
    # first, so at no moment does `path` name a partial checkpoint
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read(path: Path, wanted: dict[str, torch.Tensor], collective: bool, device="cpu") -> dict:
    """The state in the checkpoint, each tensor placed as `wanted` (flattened like the state) holds
    the tensor of its key, the others whole and plain on `device`. `collective`: every process of
    the process group (if one is initialised) calls this, with the same keys; otherwise this
    process reads alone."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if SKELETON not in metadata:
        raise CheckpointError(f"{str(path)!r} is a DCP checkpoint, but not one written by attention_simulator.")
    saved = {k: m for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
    check_fits(path, wanted, {key: meta.size for key, meta in saved.items()})
    # DCP fills these in place, each from the overlapping parts of every saved shard
    tensors = {key: _empty(meta, wanted.get(key), device) for key, meta in saved.items()}
    with _single_process_quietly():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), no_dist=not (collective and dist.is_initialized()))
    skeleton = torch.load(io.BytesIO(tensors.pop(SKELETON).cpu().numpy().tobytes()), weights_only=True)
    return unflatten(skeleton, tensors)


def _empty(meta: TensorStorageMetadata, like: torch.Tensor | None, device) -> torch.Tensor:
    if like is None:
        return torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    return torch.empty_like(like)


def check_fits(path: Path, wanted: dict[str, torch.Tensor], saved: dict[str, torch.Size]):
    """Every tensor the run's state has is in the checkpoint, with the same (global) shape."""
    fix = "Resume with the model and optimizer (and trainer.grad_clip, trainer.precision) the run was saved with."
    for key, tensor in wanted.items():
        if key not in saved:
            raise CheckpointError(f"Checkpoint {str(path)!r} has no {key!r}, which this run's state has. {fix}")
        if tuple(saved[key]) != tuple(tensor.shape):
            raise CheckpointError(
                f"Checkpoint {str(path)!r} holds {key!r} with shape {tuple(saved[key])}; this run's has shape "
                f"{tuple(tensor.shape)}. {fix}"
            )


def _encode(skeleton) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_quietly():
    # DCP warns on every single-process save or load, even when asked for one (no_dist=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
