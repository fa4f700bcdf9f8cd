"""Where a dataset comes from: a local copy (`data.path`) or the Hugging Face Hub (or its
cache), with errors that name the dataset, what was tried and how to point at a local copy."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import DatasetUnavailableError


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
