"""What several test files share: the training command run in-process through its real entry
point, as a subprocess, or under torchrun; groups of gloo processes that leave as the trainer
does; and small references written out (edit distance)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attention_simulator.config import CONFIG_DIR
from attention_simulator.distributed import leave
from attention_simulator.train import run

# What a test does not inspect is off unless the test sets it: W&B (seconds per run), the console,
# progress bars, the report figures, the Lipschitz estimate and a language model's text samples.
QUIET = {"logger.wandb": False, "logger.console": False, "trainer.progress": False, "trainer.report": False,
         "diagnostics.lipschitz": False, "task.sample_prompts": []}  # fmt: skip
SUBPROCESS_ENV = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
# Processes that run at once share two cores: one thread each (two torch processes with two threads
# each slow each other down many times over).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def compose_config(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_config(*overrides: str):
    """The config `train` runs: the overrides composed, then QUIET's value for each of its keys
    that the config has and the overrides do not name."""
    cfg = compose_config(*overrides)
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    for key, value in QUIET.items():
        parent, leaf = key.rsplit(".", 1)
        if key not in named and leaf in OmegaConf.select(cfg, parent, default={}):
            OmegaConf.update(cfg, key, value)
    return cfg


def train(run_dir: Path, *overrides: str) -> float:
    """The training command in this process, through its real entry point (`run_config`'s config):
    the final evaluation of the task's main metric."""
    return run(run_config(*overrides), Path(run_dir))


def run_train(*args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    """`python -m attention_simulator.train ARGS` as a user types it, in `cwd` (env_extra=ONE_THREAD
    where it runs beside another torch process)."""
    env = {**os.environ, **SUBPROCESS_ENV, **(env_extra or {})}
    command = [sys.executable, "-m", "attention_simulator.train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def torchrun(*args, cwd, processes=2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m attention_simulator.train ARGS` in `cwd`."""
    env = {**os.environ, **SUBPROCESS_ENV, **ONE_THREAD}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "attention_simulator.train", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def spawn(fn, tmp_dir, *args, world: int = 2):
    """Run `fn(rank, *args)` in `world` processes of one gloo group (its store in `tmp_dir`); a
    failure in any process raises here, with its traceback, and stops the others. Each process
    leaves the group as the trainer does (attention_simulator.distributed.leave), so none can
    die at exit after its checks passed."""
    with mock.patch.dict(os.environ, ONE_THREAD):  # the children's environment: they share two cores
        mp.spawn(_member, args=(fn, str(tmp_dir), world, args), nprocs=world)


def _member(rank: int, fn, tmp_dir: str, world: int, args: tuple):
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp_dir, "store"), world)
    # a process that failed is stopped by mp.spawn; a short timeout bounds any wait for it
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, *args)
    except BaseException:
        leave(clean=False)
        raise
    leave()


def levenshtein(a, b) -> int:
    """Edit distance between two sequences (strings, or lists of words), row by row."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]
