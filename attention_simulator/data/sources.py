"""Where a dataset comes from: a local copy (`data.path`), the Hugging Face Hub (or its cache),
or a corpus this project builds once (digits, synthesised speech); errors name the dataset,
what was tried and how to point at a local copy."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import datasets

from ..errors import DatasetUnavailableError

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where what this project builds from datasets is kept: `attention_simulator/` in datasets' cache."""
    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "attention_simulator"


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def built_by_one(path: Path, build: Callable[[Path], None], what: str) -> Path:
    """`path` (a file or a folder), made once by `build(tmp)`: it writes a temporary sibling that
    is then renamed into place, so an interrupted build is never mistaken for a complete one (its
    leftovers are removed by the next build on the same machine).

    Under torchrun the first process of each machine builds while the others wait for the file
    (a collective barrier would time out during an hours-long build); processes that race
    otherwise (a sweep's runs) each build, and the first to finish is kept."""
    if path.exists():
        return path
    if os.environ.get("LOCAL_RANK", "0") != "0":
        log.info(f"waiting for local rank 0 to build {what}")
        while not path.exists():
            time.sleep(1)
        return path
    host = socket.gethostname()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.{host}.*.tmp"):  # an interrupted build's
        if not _alive(int(stale.name.rsplit(".", 2)[1])):
            _remove(stale)
    tmp = path.with_name(f"{path.name}.{host}.{os.getpid()}.tmp")
    try:
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # a folder another process finished first
            if not path.exists():
                raise
    finally:
        _remove(tmp)
    return path


def built_once(key: str, build: Callable[[], datasets.DatasetDict], cache_dir: str | None = None):
    """A DatasetDict built on first use (`built_by_one`) and kept under `attention_simulator/KEY`."""
    path = built_by_one(cache_root(cache_dir) / key, lambda tmp: build().save_to_disk(str(tmp)), f"dataset {key}")
    return datasets.load_from_disk(str(path))


def local_root(name: str, path: str, how_to: str) -> Path:
    """`data.path` as a Path that exists; `how_to` ends the error otherwise."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetUnavailableError(f"Dataset {name!r}: data.path={str(root)!r} does not exist. {how_to}.")
    return root


def load_from_hub(name: str, hub_id: str, config: str | None, how_to: str, streaming: bool = False):
    """`datasets.load_dataset(hub_id, config)`; offline or missing, an error with both fixes."""
    try:
        return datasets.load_dataset(hub_id, config, streaming=streaming)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        call = f"datasets.load_dataset({hub_id!r}{f', {config!r}' if config else ''})"
        raise DatasetUnavailableError(
            f"Dataset {name!r}: could not load {hub_id!r} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). {how_to}; or download it once with network "
            f"access: {call}."
        ) from e
