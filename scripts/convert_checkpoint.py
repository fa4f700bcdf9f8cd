"""Convert a checkpoint between its two formats: a sharded DCP directory and a single file.

    python scripts/convert_checkpoint.py RUN/checkpoints/step_0000100.dcp RUN/checkpoints/step_0000100.pt
    python scripts/convert_checkpoint.py RUN/checkpoints/step_0000100.pt OUT/step_0000100.dcp [--force]

A .dcp directory (an FSDP run's, one shard per process) becomes one .pt file with its .sha256
marker, which trainer.resume=FILE and `attention_simulator.generate ckpt=FILE` take (generate
finds the run's config two levels up, so keep the file in RUN/checkpoints/). A .pt file becomes
a .dcp directory, which a sharded run resumes from at any number of processes. Either way the
whole state passes through this process's memory, and the destination appears only once
complete; an existing one is replaced only with --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attention_simulator.checkpoint import is_sharded, load_checkpoint, save_checkpoint, save_sharded
from attention_simulator.cli import exit_on_user_error
from attention_simulator.errors import ConfigError


def convert(src: Path, dst: Path, force: bool = False) -> dict:
    """Write the checkpoint `src` in the other format to `dst`; returns the state."""
    if src.suffix not in (".pt", ".dcp"):
        raise ConfigError(f"SRC {str(src)!r} is not a checkpoint: pass a .dcp directory or a .pt file.")
    kind = ".pt" if is_sharded(src) else ".dcp"
    if dst.suffix != kind:
        raise ConfigError(f"DST {str(dst)!r} must end in {kind}: a {src.suffix} checkpoint converts to a {kind} one.")
    if dst.exists() and not force:
        raise ConfigError(f"DST {str(dst)!r} exists; nothing was written. Pass --force to replace it.")
    state = load_checkpoint(src, fix="SRC must be a checkpoint: a .dcp directory or a .pt file.")
    (save_checkpoint if kind == ".pt" else save_sharded)(dst, state)
    return state


def summary(dst: Path, state: dict) -> str:
    model = state.get("model") or {}
    tensors = [t for t in model.values() if isinstance(t, torch.Tensor)]
    return (
        f"wrote {dst}: step {state.get('step')}, keys {', '.join(map(str, state))}; "
        f"model: {sum(t.numel() for t in tensors):,} parameters in {len(tensors)} tensors"
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the checkpoint: a step_*.dcp directory or a step_*.pt file")
    parser.add_argument(
        "dst", type=Path, help="where to write it: a .pt file for a .dcp SRC, a .dcp directory for a .pt"
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    dst = args.dst.expanduser()
    with exit_on_user_error():
        print(summary(dst, convert(args.src.expanduser(), dst, args.force)))


if __name__ == "__main__":
    main()
