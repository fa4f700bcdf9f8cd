"""Checkpoint files: written atomically, verified before loading.

`step_0000100.pt` is written to a temporary file, fsynced and renamed into place; then its
SHA-256 goes to `step_0000100.pt.sha256` the same way, in `sha256sum`'s format (so
`sha256sum -c step_0000100.pt.sha256` checks a copy by hand). The digest file is the commit marker:
a checkpoint without one (a crash mid-save) or whose digest differs (a corrupt copy) is never
loaded. torch's own zip reader catches truncation but not flipped bits.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError

PATTERN = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.pt"


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


def verify(path: Path, fix: str = "Pass an existing checkpoints/step_*.pt file.") -> None:
    """Raise CheckpointError unless `path` is a complete, uncorrupted checkpoint; `fix` says
    what to pass instead when it does not exist (the caller knows which option it came from)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. {fix}")
    digest = path.with_name(path.name + ".sha256")
    if not digest.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no {digest.name} marker: it was not completely written (or is not a "
            "checkpoint of this project). Resume from an earlier checkpoints/step_*.pt instead."
        )
    if digest.read_text().split()[:1] != [_sha256(path)]:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is corrupt: its SHA-256 differs from {digest.name}. "
            "Resume from an earlier checkpoints/step_*.pt instead."
        )


def load_checkpoint(path: Path, map_location="cpu", fix: str = "Pass an existing checkpoints/step_*.pt file.") -> dict:
    verify(path, fix)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint {str(path)!r} could not be read ({type(e).__name__}: {e}).") from e


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest step first (complete or not)."""
    directory = Path(directory)
    found = [(int(m.group(1)), p) for p in directory.glob("step_*.pt") if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


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
    """`auto` -> newest valid checkpoint in run_dir (or None); a directory -> its newest; a file -> itself."""
    if resume == "auto":
        return latest_valid(Path(run_dir) / "checkpoints")
    target = Path(resume).expanduser()
    if target.is_dir():
        directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found = latest_valid(directory)
        if found is None:
            raise CheckpointError(
                f"trainer.resume={resume!r}: no complete checkpoint (step_*.pt) in {str(directory)!r}."
            )
        return found
    verify(target, "Pass trainer.resume=auto to continue the run in hydra.run.dir, or trainer.resume=PATH with an "
                   "existing checkpoints/step_*.pt file or run directory.")  # fmt: skip
    return target


def prune(directory: Path, keep: int):
    """Delete all but the newest `keep` checkpoints (and their markers)."""
    for path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
