"""The README command, run as a user runs it, and what its run directory holds."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from attention_simulator.config import CONFIG_DIR


def run_train(*args, cwd, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "attention_simulator.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_vit_sigmoid_command_writes_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        "+experiment=vit_sigmoid", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=2",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    resolved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert resolved["attention"]["backend"] == "sigmoid" and resolved["model"]["layer_scale"] == 1e-4

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(metrics["step"]) == [2, 3, 4, 6]
    assert metrics["eval/accuracy"].notna().sum() == 2 and metrics["train/loss"].notna().sum() == 3
    assert {"train/lr", "train/grad_norm", "train/steps_per_sec"} <= set(metrics.columns)

    assert (run_dir / "checkpoints" / "step_0000006.pt").exists()
    assert (run_dir / "checkpoints" / "step_0000006.pt.sha256").exists()
    with Image.open(run_dir / "report" / "curves.png") as png:
        assert png.size[0] > 600 and png.getextrema() != ((255, 255),) * 4
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_help_lists_the_config_groups(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in result.stdout
