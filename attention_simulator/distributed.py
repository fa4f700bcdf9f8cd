"""torchrun / DDP: joining the process group, which process writes, cross-process reductions.

`torchrun --nproc_per_node=N -m attention_simulator.train ...` starts N copies of the entry
point with RANK, LOCAL_RANK and WORLD_SIZE set; each joins one process group (NCCL on CUDA,
gloo on CPU), trains on its slice of every global batch, and only rank 0 writes files.
Without torchrun everything here is a no-op for a world of one.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that logs, checkpoints and writes reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); readable before joining."""
    return int(os.environ.get("RANK", "0"))


def join(device: str) -> tuple[World, str]:
    """Join torchrun's process group, if launched by it; returns the world and this process's
    device (`cuda` becomes `cuda:LOCAL_RANK`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    world = World(launched_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return world, device


def leave(clean: bool = True):
    """Leave the process group so that the process can exit cleanly.

    After a clean run every process first waits for the others (no process tears the group down
    while another still talks to it); after a failure it does not, since the others may be inside
    another collective. The group is then destroyed *and its worker threads joined* while Python
    is still whole. destroy_process_group() alone does not join them: DTensor's sharding caches
    keep every DeviceMesh alive, and a mesh keeps its process groups. A gloo worker that outlives
    the interpreter's shutdown needs the GIL the moment it drops the last reference to a tensor
    of a finished collective; Python ends such a thread inside C++ and the process dies with
    "terminate called without an active exception" (SIGABRT), after a run that completed."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh):
            getattr(obj, "_pg_registry", {}).clear()  # the destroyed groups, which nothing can use again
    gc.collect()  # groups held in reference cycles (FSDP's state) are destroyed now, not at shutdown


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over processes (in place); the tensor itself for a world of one."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def from_main(value):
    """Rank 0's value of a picklable object, on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every process's value of a picklable object, in rank order, on every process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def reduce_metrics(names: list[str], values: torch.Tensor) -> torch.Tensor:
    """values (N,) of this process -> over all processes: names ending in `_max` by max, `_min`
    by min, `rms` as the root of the mean square, the rest averaged (each process holds an equal
    share of the batch). One collective."""
    if not dist.is_initialized():
        return values
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    stacked = torch.stack(gathered)  # (processes, N)

    def rule(suffix):
        return torch.tensor([n.endswith(suffix) for n in names], device=values.device)

    rms = stacked.square().mean(0).sqrt()
    reduced = torch.where(rule("rms"), rms, stacked.mean(0))
    return torch.where(rule("_max"), stacked.amax(0), torch.where(rule("_min"), stacked.amin(0), reduced))
