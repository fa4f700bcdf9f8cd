"""Memory per process: ddp vs fsdp, and context_parallel 1 vs 2.

    python scripts/bench_memory.py [--model lm_small] [--processes 2] [--seq-len 4096]

1. Model state: `--model` with AdamW, one training step, under `trainer.parallel` ddp and fsdp
   in `--processes` processes. Reported per process: the bytes of parameters + gradients +
   optimizer state it holds (counted from the tensors: a DTensor counts its local shard), and
   the measured peak (CUDA: torch.cuda.max_memory_allocated; CPU: the peak RSS of the process,
   which includes the whole model every process builds on the host before sharding it).
2. Activations: one forward of `lm_tiny` with the FlashSigmoid backend over a `--seq-len`-token
   sequence, in 1 process and split over 2 (context parallel, ring attention): the bytes autograd
   keeps between forward and backward, per process, in the attention layers and in the model.

Each configuration runs in fresh worker processes (gloo on CPU, NCCL on GPUs), started here.
Prints a table with the ratios; the goals are ≤ 0.55 for fsdp / ddp and for cp 2 / cp 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

import optorch
from attention_simulator.attention import Attention
from attention_simulator.checkpoint_sharded import flatten
from attention_simulator.config import CONFIG_DIR
from attention_simulator.distributed import World, leave
from attention_simulator.parallel import Parallel
from attention_simulator.train import build_model, build_optimizer

VOCAB = 257  # the byte tokenizer's


def config(model: str, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["+experiment=lm_flash_sigmoid", f"model={model}", *overrides])


def local_bytes(tensors) -> int:
    """Bytes this process holds for these tensors (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def model_state(parallel: Parallel, device, args) -> dict:
    """One AdamW step of `args.model`; what the process holds and its peak."""
    cfg = config(args.model)
    model = build_model(cfg, {"vocab_size": VOCAB})  # on the host, as the trainer builds it
    train_model = parallel.wrap(model, device)  # to the device: whole (ddp) or as shards (fsdp)
    params = dict(model.named_parameters())
    optimizer, _ = build_optimizer(cfg, model)
    state = optimizer.init(params)
    tokens = torch.randint(0, VOCAB, (1, 256), device=device)
    logits = train_model(tokens)  # (1, T, V)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    grads = {k: p.grad for k, p in params.items()}
    held = local_bytes(params.values()) + local_bytes(grads.values())
    _, buffers = flatten(optorch.state_dict(state))
    held += local_bytes(t for t in buffers.values() if t.is_floating_point())
    updates, state = optimizer.update(grads, state, params)
    optorch.apply_updates(params, updates)
    return {"held": held, "peak": peak_bytes(device)}


def activations(parallel: Parallel, device, args) -> dict:
    """Bytes autograd saves for backward in one forward of a long sequence, on this process: in
    the attention layers (projections, positions, the attention itself) and in the whole model."""
    cfg = config("lm_tiny", f"data.seq_len={args.seq_len}")
    torch.manual_seed(0)
    model = build_model(cfg, {"vocab_size": VOCAB}).to(device)
    tokens = torch.randint(0, VOCAB, (1, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    batch = parallel.split({"tokens": tokens})  # this process's share, and its positions under cp
    inside = [0]  # > 0 while an attention layer runs
    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1))
            module.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1))
    saved = {"attention": {}, "model": {}}

    def pack(t):
        storage = t.untyped_storage()
        for where in ("attention", "model") if inside[0] else ("model",):
            saved[where][storage.data_ptr()] = storage.nbytes()
        return t

    with parallel.context(model):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps
            loss = model(batch["tokens"], positions=batch.get("positions")).float().sum()
        loss.backward()
    return {where: sum(sizes.values()) for where, sizes in saved.items()}


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(rank: int, world_size: int, what: str, mode: str, cp: int, args, out: str, init: str):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    world = World(rank, world_size, rank)
    if world_size > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world_size)
    parallel = Parallel.setup(world, device.type, mode, cp)
    result = (model_state if what == "model" else activations)(parallel, device, args)
    Path(out, f"{what}-{mode}-{cp}-{rank}.json").write_text(json.dumps(result))
    leave()


def measure(what: str, mode: str, processes: int, cp: int, args, out: str) -> dict:
    """Start `processes` workers for one configuration; rank 0's numbers (ranks hold equal shares)."""
    init = f"file://{out}/init-{what}-{mode}-{cp}"
    mp.spawn(worker, args=(processes, what, mode, cp, args, out, init), nprocs=processes, join=True)
    return json.loads(Path(out, f"{what}-{mode}-{cp}-0.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lm_small", help="a model config (configs/model) for the state part")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens of the activation part's sequence")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        ddp = measure("model", "ddp", args.processes, 1, args, out)
        fsdp = measure("model", "fsdp", args.processes, 1, args, out)
        one = measure("activations", "ddp", 1, 1, args, out)
        split = measure("activations", "ddp", 2, 2, args, out)
    mib = 2**20
    kind = "peak allocated (CUDA)" if torch.cuda.is_available() else "peak RSS"
    print(f"{args.model}, AdamW, {args.processes} processes: per process, MiB")
    print(f"{'':28s}{'ddp':>10s}{'fsdp':>10s}{'fsdp/ddp':>10s}")
    for key, label in (("held", "params + grads + optimizer"), ("peak", kind)):
        print(f"{label:28s}{ddp[key] / mib:10.0f}{fsdp[key] / mib:10.0f}{fsdp[key] / ddp[key]:10.2f}")
    print(f"\nlm_tiny, flash_sigmoid, one {args.seq_len}-token sequence: saved for backward per process, MiB")
    print(f"{'':28s}{'cp=1':>10s}{'cp=2':>10s}{'cp2/cp1':>10s}")
    for key, label in (("attention", "attention layers"), ("model", "whole model")):
        print(f"{label:28s}{one[key] / mib:10.1f}{split[key] / mib:10.1f}{split[key] / one[key]:10.2f}")


if __name__ == "__main__":
    main()
