"""Fixtures of the attention_simulator tests (helpers they share: tests/helpers.py)."""

import pytest


@pytest.fixture
def no_hub(monkeypatch):
    """Fail Hub look-ups at once instead of after a minute of retries."""
    import datasets
    import huggingface_hub

    # both libraries read the environment once, at import: set their flags too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
