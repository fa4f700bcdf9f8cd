"""The training command as a user runs it: --help, and trainer.compile (the documented commands:
tests/e2e/test_readme.py)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from attention_simulator.config import CONFIG_DIR

from ..helpers import ONE_THREAD, run_train


def test_help_lists_the_config_groups(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in result.stdout


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    def run(mode):  # the two runs at once: one core each
        # one block: the compiled graph still holds every kind of layer the model has, and compiles faster
        result = run_train("+experiment=vit_sigmoid", "model.depth=1", "trainer.max_steps=3", "trainer.log_every=1",
                           "data.batch_size=32", "trainer.progress=false", "logger.wandb=false",
                           f"trainer.compile={mode}", f"hydra.run.dir={tmp_path / mode}", cwd=tmp_path,
                           env_extra=ONE_THREAD)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        columns = ["train/loss", "train/grad_norm", "eval/loss", "eval/accuracy"]
        return pd.read_parquet(tmp_path / mode / "metrics.parquet").set_index("step")[columns]

    with ThreadPoolExecutor(2) as pool:
        compiled, eager = pool.map(run, ("true", "false"))
    pd.testing.assert_frame_equal(compiled, eager, rtol=1e-4)
