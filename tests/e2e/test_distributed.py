"""torchrun + DDP on CPU (gloo): the same trajectory as one process, only rank 0 writes, and a
2-process checkpoint resumes in 1 process."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from .test_train_command import run_train

RUN = ["+experiment=vit_sigmoid", "trainer.max_steps=6", "trainer.log_every=1", "trainer.progress=false"]


def torchrun(*args, cwd, processes=2):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "attention_simulator.train", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir):
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return frame.set_index("step")[["train/loss", "train/grad_norm", "eval/loss", "eval/accuracy"]]


def test_ddp_matches_one_process_writes_once_and_resumes_in_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = torchrun(*RUN, "data.batch_size=16", "logger.wandb=true", f"hydra.run.dir={two}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train(*RUN, "data.batch_size=32", "logger.wandb=false", f"hydra.run.dir={one}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    # 2 processes × 16 is the same global batch as 1 × 32: the same trajectory, to float round-off
    pd.testing.assert_frame_equal(losses(two), losses(one), rtol=1e-5)
    assert losses(two).loc[6, "eval/accuracy"] == losses(one).loc[6, "eval/accuracy"]  # the whole test split

    # only rank 0 wrote: one run directory, one W&B run, one set of checkpoints and configs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert sorted(p.name for p in two.iterdir()) == [".hydra", "checkpoints", "metrics.parquet", "report", "train.log",
                                                     "wandb"]  # fmt: skip
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000006.pt", "step_0000006.pt.sha256"]
    assert result.stdout.count("run dir:") == 1

    # the 2-process checkpoint continues in 1 process exactly as the 1-process run does
    for run_dir in (one, two):
        more = ["trainer.max_steps=8", "data.batch_size=32", "logger.wandb=false", "trainer.resume=auto"]
        result = run_train(*RUN, *more, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0 and "at step 6" in result.stdout + result.stderr, result.stderr[-3000:]
    assert "resuming a 2-process run in 1" in result.stdout + result.stderr
    pd.testing.assert_frame_equal(losses(two).loc[7:], losses(one).loc[7:], rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    runs = {}
    for mode in ("false", "true"):
        run_dir = tmp_path / mode
        result = run_train(*RUN, "trainer.max_steps=3", "data.batch_size=32", "logger.wandb=false",
                           f"trainer.compile={mode}", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = losses(run_dir)
    pd.testing.assert_frame_equal(runs["true"], runs["false"], rtol=1e-4)
