"""Compose the real configs and run the real entry point in-process."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from attention_simulator.config import CONFIG_DIR
from attention_simulator.train import run

# W&B startup costs seconds per run; tests that check W&B turn it on explicitly.
QUIET = ["logger.wandb=false", "logger.console=false", "trainer.progress=false"]


def compose_config(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train(run_dir: Path, *overrides: str) -> float:
    return run(compose_config(*QUIET, *overrides), Path(run_dir))


@pytest.fixture
def no_hub(monkeypatch):
    """Fail Hub look-ups at once instead of after a minute of retries."""
    import datasets
    import huggingface_hub

    # both libraries read the environment once, at import: set their flags too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
