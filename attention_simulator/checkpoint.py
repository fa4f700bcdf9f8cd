"""Checkpoints, in two formats behind one API: written atomically, verified before loading.

A single file, `step_0000100.pt` (one process, DDP), is written to a temporary file, fsynced and
renamed into place; then its SHA-256 goes to `step_0000100.pt.sha256` the same way, in
`sha256sum`'s format (so `sha256sum -c step_0000100.pt.sha256` checks a copy by hand). The digest
file is the commit marker: a checkpoint without one (a crash mid-save) or whose digest differs (a
corrupt copy) is never loaded. torch's own zip reader catches truncation but not flipped bits.

A sharded run (FSDP) writes a DCP directory, `step_0000100.dcp/`, every process its own shards
(checkpoint_sharded.py); it appears under that name only once complete, and its commit marker
is DCP's `.metadata`. Either format loads into any number of processes (`load_into`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError

# checkpoint_sharded (DCP, DTensor) is imported inside the functions that use it: importing it
# takes ~1.5 s, which runs that never shard need not pay

PATTERN = re.compile(r"step_(\d+)\.(pt|dcp)$")
EARLIER = "Resume from an earlier checkpoints/step_* instead."


def checkpoint_path(directory: Path, step: int, sharded: bool = False) -> Path:
    return Path(directory) / f"step_{step:07d}.{'dcp' if sharded else 'pt'}"


def is_sharded(path: Path) -> bool:
    """A DCP directory (by its name: whether or not it exists)."""
    return Path(path).suffix == ".dcp"


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = path.with_name(path.name + ".sha256")
    digest.unlink(missing_ok=True)  # overwriting a step: the old marker must not vouch for the new file
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _atomic_write(digest, f"{_sha256(path)}  {path.name}\n".encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, fix: str = "Pass an existing checkpoints/step_* file or directory.") -> None:
    """Raise CheckpointError unless `path` is a complete, uncorrupted checkpoint; `fix` says
    what to pass instead when it does not exist (the caller knows which option it came from)."""
    path = Path(path)
    if is_sharded(path):
        _verify_sharded(path, fix)
        return
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. {fix}")
    digest = path.with_name(path.name + ".sha256")
    if not digest.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no {digest.name} marker: it was not completely written (or is not a "
            f"checkpoint of this project). {EARLIER}"
        )
    if digest.read_text().split()[:1] != [_sha256(path)]:
        raise CheckpointError(f"Checkpoint {str(path)!r} is corrupt: its SHA-256 differs from {digest.name}. {EARLIER}")


def _verify_sharded(path: Path, fix: str):
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist (a .dcp checkpoint is a directory). {fix}")
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no .metadata file: it was not completely written (or is not a DCP "
            f"checkpoint). {EARLIER}"
        )


def load_checkpoint(
    path: Path, map_location="cpu", fix: str = "Pass an existing checkpoints/step_* file or directory."
) -> dict:
    """The whole state as saved, read by this process alone: a sharded checkpoint's tensors come whole
    and plain (on `map_location`, a device)."""
    verify(path, fix)
    if is_sharded(path):
        from . import checkpoint_sharded as sharded

        return sharded.read(Path(path), {}, collective=False, device=map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint {str(path)!r} could not be read ({type(e).__name__}: {e}).") from e


def load_into(path: Path, template: dict) -> dict:
    """The checkpoint at `path` (either format), placed as `template` (e.g. this run's state) holds
    its tensors: where the template has a tensor, the result has one of its type, dtype, device and
    sharding (a DTensor gets this process's shard); everything else is as saved. Every tensor of the
    template must be in the checkpoint, with the same shape. Called on every process (collective)
    when a process group is initialised."""
    from . import checkpoint_sharded as sharded

    path = Path(path)
    wanted = sharded.flatten(template)[1]
    if is_sharded(path):
        verify(path)
        return sharded.read(path, wanted, collective=True)
    skeleton, full = sharded.flatten(load_checkpoint(path))
    sharded.check_fits(path, wanted, {key: tensor.shape for key, tensor in full.items()})
    return sharded.unflatten(skeleton, {key: sharded.place(tensor, wanted.get(key)) for key, tensor in full.items()})


def save_sharded(path: Path, state: dict) -> None:
    """Write `state` (tensors plain or DTensors) as the DCP directory `path` (`checkpoint_path(...,
    sharded=True)`), replacing one of that step. Called on every process (collective) when a
    process group is initialised; plain tensors and other values must be the same on every one."""
    from . import checkpoint_sharded as sharded

    sharded.save(Path(path), state)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory` (files and DCP directories), oldest step first (complete or not)."""
    found = [(int(m.group(1)), p.name, p) for p in Path(directory).glob("step_*") if (m := PATTERN.search(p.name))]
    return [p for _, _, p in sorted(found)]


def latest_valid(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; skipped ones are reported, never loaded."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping {path.name}: {e}", stacklevel=2)
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto` -> newest valid checkpoint in run_dir (or None); a run or checkpoints directory -> its
    newest; a checkpoint (file or .dcp directory) -> itself."""
    if resume == "auto":
        return latest_valid(Path(run_dir) / "checkpoints")
    target = Path(resume).expanduser()
    if target.is_dir() and not is_sharded(target):
        directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found = latest_valid(directory)
        if found is None:
            raise CheckpointError(
                f"trainer.resume={resume!r}: no complete checkpoint (step_*.pt or step_*.dcp) in {str(directory)!r}."
            )
        return found
    verify(target, "Pass trainer.resume=auto to continue the run in hydra.run.dir, or trainer.resume=PATH with an "
                   "existing checkpoints/step_* file or directory, or run directory.")  # fmt: skip
    return target


def prune(directory: Path, keep: int):
    """Delete all but the newest `keep` checkpoints (and their markers); on one process only."""
    for path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        if is_sharded(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
