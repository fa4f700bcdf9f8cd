"""How a run uses its processes: one DeviceMesh with named dimensions.

    dp  data parallel: each slice of processes trains on its own part of every global batch
    cp  context parallel: the processes of one dp slice each hold 1/cp of every sequence, and
        attention runs as ring attention over them (`attention/ring.py`)

`trainer.parallel` picks how the model is replicated over all processes: `ddp`
(DistributedDataParallel: a full copy of the model and the optimizer state per process,
gradients all-reduced) or `fsdp` (FSDP2's `fully_shard` on every transformer block and the
root, as torchtitan does: parameters, gradients and optimizer state sharded, each block's
parameters gathered only while it runs). Gradients are averaged over dp × cp processes: the cp
processes of a sequence each hold an equal share of its tokens, so the mean of their mean
losses is the sequence's mean loss. Models stay single-device code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attention import Attention, ring
from .distributed import World
from .errors import ConfigError


@dataclass
class Parallel:
    """This process's place in the run: the world, its dp slice and its context-parallel group."""

    world: World = World()
    mode: str = "ddp"
    context_parallel: int = 1
    mesh: object | None = None  # DeviceMesh (dp, cp) under torchrun
    cp: ring.ContextParallel | None = None

    @property
    def dp_size(self) -> int:
        return self.world.world_size // self.context_parallel

    @property
    def dp_rank(self) -> int:
        return self.world.rank // self.context_parallel

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @classmethod
    def setup(cls, world: World, device: str, mode: str = "ddp", context_parallel: int = 1) -> Parallel:
        check_world(world, mode, context_parallel)
        if not world.distributed:
            return cls(world)
        from torch.distributed.device_mesh import init_device_mesh

        dp = world.world_size // context_parallel
        mesh = init_device_mesh(torch.device(device).type, (dp, context_parallel), mesh_dim_names=("dp", "cp"))
        cp = None
        if context_parallel > 1:
            cp = ring.ContextParallel(mesh.get_group("cp"), mesh.get_local_rank("cp"), context_parallel)
        return cls(world, mode, context_parallel, mesh, cp)

    # ---- the model -----------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
             reshard_after_forward: bool = True) -> nn.Module:  # fmt: skip
        """Move the model to the device and return what training steps call: the model itself
        (one process; fsdp shards it in place) or its DDP wrapper. Sharded, the parameters reach
        the device as shards, block by block: the whole model is never on one device."""
        if self.sharded:
            shard(model, self.mesh._flatten("dp_cp"), param_dtype, reshard_after_forward)
            return model.to(device)  # (the buffers: fully_shard moved the parameters)
        model.to(device)
        if not self.world.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ---- the data ------------------------------------------------------------------------------

    def split(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's share of each (B, T) sequence of a batch (all of it without cp), and
        under cp the shared tokens' places in their sequences (`positions`, (T_local,))."""
        if self.cp is None:
            return batch
        shares = {k: self.cp.split(v, dim=1) for k, v in batch.items()}
        first = next(iter(shares.values()))
        return shares | {"positions": self.cp.positions(first.shape[1], first.device)}

    def context(self, model: nn.Module):
        """While active, the model's attention layers run as ring attention over the cp group
        (enter it around forward and backward: activation checkpointing recomputes in backward)."""
        return context_parallel(model, self.cp) if self.cp is not None else contextlib.nullcontext()


@contextlib.contextmanager
def context_parallel(model: nn.Module, cp: ring.ContextParallel):
    """While active, every attention layer of `model` takes this process's share of each
    sequence and attends over `cp` with ring attention: applied from outside, as FSDP is, to a
    model whose code is unchanged. Cross-attention has no shared sequence to split: refused."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if any(layer.cross for layer in layers):
        raise ValueError("cross-attention is not context-parallel: its keys are another sequence.")
    for layer in layers:
        layer.sequence_parallel = cp
    try:
        yield model
    finally:
        for layer in layers:
            layer.sequence_parallel = None


def shard(model: nn.Module, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool):
    """FSDP2 on every transformer block, then on the root (embeddings, head, norms): one
    all-gather per block in forward and backward, one reduce-scatter of its gradients.
    Reductions stay in fp32 whatever the compute precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"trainer.parallel=fsdp shards a model's `blocks`; {type(model).__name__} has none.")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again first thing in backward (the head): keep them
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def check_world(world: World, mode: str, context_parallel: int):
    """What the options need of the processes torchrun started."""
    if mode == "fsdp" and not world.distributed:
        raise ConfigError(
            "trainer.parallel=fsdp shards the model over processes, but this is one process: start it with "
            "`torchrun --nproc_per_node=N -m attention_simulator.train ...` (N >= 2), or use trainer.parallel=ddp."
        )
    if world.world_size % context_parallel:
        raise ConfigError(
            f"trainer.context_parallel={context_parallel} must divide the number of processes ({world.world_size}): "
            "each data-parallel slice holds context_parallel processes. Change --nproc_per_node or the option."
        )


def check_context_parallel(size: int, cfg, attention, compile: bool):
    """What splitting sequences over `size` processes needs of the rest of the config (checked
    before anything is built)."""
    if size == 1:
        return
    seq_len = cfg.data.get("seq_len")
    if seq_len is None:
        raise ConfigError(
            f"trainer.context_parallel={size} splits the sequences of language models; data={cfg.data.get('name')} "
            "has none. Use it with a language model (+experiment=lm_*), or set trainer.context_parallel=1."
        )
    if cfg.data.get("masking") is not None or cfg.data.get("document_masks"):
        raise ConfigError(
            f"trainer.context_parallel={size} splits whole next-token blocks; masked modelling (data.masking) and "
            "packed documents (data.document_masks) pad and regroup them. Turn those off or set "
            "trainer.context_parallel=1."
        )
    uneven = [n for n in (seq_len, *(cfg.data.get("eval_seq_lens") or [])) if n % (2 * size)]
    if uneven:
        raise ConfigError(
            f"trainer.context_parallel={size} cuts every sequence into {2 * size} equal chunks (two per process, "
            f"so that causal attention costs every process the same); the lengths {uneven} (data.seq_len, "
            f"data.eval_seq_lens) are not multiples of {2 * size}. Change them or trainer.context_parallel."
        )
    if compile:
        raise ConfigError(
            "trainer.compile=true cannot compile ring attention's transfers (trainer.context_parallel > 1): "
            "turn one of them off."
        )
    ring.check_supported(attention)


def even_batches(count: int, device) -> int:
    """The most evaluation batches any process has: under fsdp every forward is a collective,
    so a process with fewer batches must run as many forwards as the others."""
    if not dist.is_initialized():
        return count
    most = torch.tensor(count, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)
