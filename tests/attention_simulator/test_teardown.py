"""Leaving the process group joins gloo's worker threads while Python is still whole.

A gloo worker still running when the interpreter shuts down needs the GIL the moment it drops the
last reference to a finished collective's tensor; Python then ends that thread inside C++, and a
process whose work succeeded dies with "terminate called without an active exception" (SIGABRT).
destroy_process_group() alone leaves the workers running whenever a DeviceMesh is alive, and
DTensor's sharding caches keep every mesh (and a mesh its groups) alive after FSDP2.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from attention_simulator.distributed import leave

from ..helpers import spawn

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def gloo_workers() -> list[str]:
    """The names of this process's threads that run gloo collectives ("pt_gloo_runloop")."""
    names = (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return [name for name in names if name.startswith("pt_gloo")]


def _leave_after_fsdp(rank: int):
    mesh = init_device_mesh("cpu", (2,))
    model = fully_shard(nn.Linear(4, 4), mesh=mesh)
    model(torch.randn(3, 4)).sum().backward()
    # collectives whose tensors only the workers hold once Python lets go of them: the ingredient
    # of the abort, had the workers lived on into the interpreter's shutdown
    works = [dist.all_reduce(torch.ones(1000), async_op=True) for _ in range(50)]
    for work in works:
        work.wait()
    del works, model, mesh
    assert len(gloo_workers()) >= 1, "no gloo worker threads found by name: the check below would prove nothing"
    leave()
    assert gloo_workers() == [], f"{gloo_workers()} still running after leave()"


def test_leave_joins_gloo_workers_after_fsdp(tmp_path):
    spawn(_leave_after_fsdp, tmp_path)
