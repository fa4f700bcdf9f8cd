"""The run directory: one writer at a time, the configs it ran with, and undoing a failed start.

A lock (`RUN_DIR/.lock`, an exclusive `flock` naming its holder's host and PID) stops a second
process -- a requeued job, a second terminal with `trainer.resume=auto` -- from training on the
same checkpoints, parquet and W&B files while the first is running. The kernel releases the
lock when its holder dies, however it dies; the next run takes over the file it left, saying so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

LOCK_NAME = ".lock"


class RunLockedError(ConfigError):
    """Another live process holds the run directory's lock."""


def _describe(holder: dict) -> str:
    return f"PID {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


class RunLock:
    """Exclusive use of a run directory by this process, until `release`, exit, or this object
    is garbage-collected (its open file holds the lock)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None

    @staticmethod
    def _holder(f) -> dict:
        f.seek(0)
        try:
            return json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            return {}

    def acquire(self) -> str | None:
        """Take the lock. Returns a message when a dead holder's lock was taken over; raises
        RunLockedError naming the holder when a live one has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 -- held open: the lock lasts as long as the file
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(f)
                f.close()
                raise RunLockedError(
                    f"{str(self.path.parent)!r} is in use by another training process: {_describe(holder)}. Nothing "
                    "was changed. Wait for it to finish (or stop it), or train in another hydra.run.dir."
                ) from None
            except OSError as e:  # a filesystem without flock support: run unlocked, say so
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                f.close()
                warnings.warn(f"{self.path}: this filesystem cannot lock files; nothing stops a second writer.",
                              stacklevel=2)  # fmt: skip
                return None
            # a releasing holder unlinks the file: if ours was unlinked before we locked it, retry
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        previous = self._holder(f)
        f.seek(0)
        f.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        f.flush()
        self.file = f
        return f"taking over the lock of {_describe(previous)}, which is no longer running" if previous else None

    def release(self):
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            self.file.close()  # closing releases the flock
            self.file = None


def save_configs(run_dir: Path, cfg: DictConfig):
    """`.hydra/config.yaml` (as composed, interpolations kept), `config_resolved.yaml` (every
    value resolved: what the run used) and, under Hydra, `overrides.yaml` and `hydra.yaml`."""
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), out / "config_resolved.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")


def snapshot(run_dir: Path) -> set[Path]:
    """Every path under the run directory now (to undo a failed start)."""
    run_dir = Path(run_dir)
    return {run_dir} | set(run_dir.rglob("*")) if run_dir.exists() else set()


def undo_start(run_dir: Path, before: set[Path]):
    """Remove what a failed start added since `before`. A directory that held nothing but empty
    logs (Hydra makes the run directory and its log before the job starts) goes entirely,
    with the empty folders above it."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    fresh = all(p == run_dir or (p.suffix == ".log" and p.is_file() and not p.stat().st_size) for p in before)
    cwd = Path.cwd()
    if fresh and run_dir.resolve() != cwd and run_dir.resolve() not in cwd.parents:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.resolve().parents:  # e.g. outputs/<name>/, if Hydra made it for this run
            if cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
        return
    if fresh:  # the working directory itself: empty it of what the start wrote, Hydra's log included
        before = {run_dir}
    for path in sorted(snapshot(run_dir) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
