"""Where a dataset comes from: a local copy (`data.path`), the Hugging Face Hub (or its cache),
or a corpus this project builds once (digits, synthesised speech); errors name the dataset,
what was tried and how to point at a local copy."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets

from ..errors import DatasetUnavailableError


def built_once(key: str, build: Callable[[], datasets.DatasetDict], cache_dir: str | None = None):
    """A DatasetDict built on first use and kept in datasets' cache under `attention_simulator/KEY`:
    saved under a temporary name and renamed, so a half-written one is never loaded, and a
    process that loses the race uses the winner's."""
    path = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "attention_simulator" / key
    if not (path / "dataset_dict.json").exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        build().save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def local_root(name: str, path: str, how_to: str) -> Path:
    """`data.path` as a Path that exists; `how_to` ends the error otherwise."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetUnavailableError(f"Dataset {name!r}: data.path={str(root)!r} does not exist. {how_to}.")
    return root


def load_from_hub(name: str, hub_id: str, config: str | None, how_to: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(hub_id, config)`; offline or missing, an error with both fixes."""
    try:
        return datasets.load_dataset(hub_id, config)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        call = f"datasets.load_dataset({hub_id!r}{f', {config!r}' if config else ''})"
        raise DatasetUnavailableError(
            f"Dataset {name!r}: could not load {hub_id!r} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). {how_to}; or download it once with network "
            f"access: {call}."
        ) from e
