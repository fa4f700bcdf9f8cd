"""Tests marked `gpu` need a CUDA device: skipped without one, so `pytest -m gpu` on a GPU
machine runs every CUDA branch and the default run stays green on CPU. Training runs that several
tests only read are trained once per session (`trained`)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from .helpers import train


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Run(NamedTuple):
    dir: Path
    final: float  # what `train` returned: the final evaluation of the task's main metric


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """`trained(*overrides)`: the run `helpers.train` makes of these overrides, trained the first
    time a test asks for it and shared after that. Read it only; a test that changes a run (resumes
    it, corrupts it) copies it first (shutil.copytree)."""
    runs: dict[tuple[str, ...], Run] = {}

    def get(*overrides: str) -> Run:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("trained")
            runs[overrides] = Run(run_dir, train(run_dir, *overrides))
        return runs[overrides]

    return get
