"""Tests marked `gpu` need a CUDA device: skipped without one, so `pytest -m gpu` on a GPU
machine runs every CUDA branch and the default run stays green on CPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
