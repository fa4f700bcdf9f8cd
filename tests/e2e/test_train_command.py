"""The training command's --help, as a user runs it (the documented commands: tests/e2e/test_readme.py)."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_help_lists_the_config_groups(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in result.stdout
