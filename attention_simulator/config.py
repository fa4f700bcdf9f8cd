"""Config plumbing: resolvers, start-up validation and building components from `_target_`.

Hydra already rejects misspelt command-line keys and group options. This module catches what
gets past it: a key in a YAML file (an experiment, say) that the target does not take, or a
top-level section nobody reads. Errors name the key and the closest valid spellings.
"""

from __future__ import annotations

import difflib
import inspect
import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .distributed import launched_rank
from .errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
SECTIONS = {"name", "task", "data", "model", "attention", "optimizer", "schedule", "diagnostics", "logger", "trainer"}
SPECIAL_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def fraction_of(fraction: float, total: int) -> int:
    """`${fraction_of:0.1,${trainer.max_steps}}`: a step count that scales with the run."""
    return round(float(fraction) * int(total))


def neg_log(n: int) -> float:
    """`${neg_log:${data.seq_len}}`: the sigmoid bias −log n fixed at the training length."""
    return -math.log(int(n))


def run_group(name: str) -> str:
    """`${run_group:${name}}`: the W&B group, `name` alone, or `name/<sweep dir>` for the runs of a
    multirun, so that each sweep is one group."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{name}/{Path(HydraConfig.get().sweep.dir).name}"
    return name


def main_process(value, otherwise=None):
    """`${main_process:A,B}`: A in the process that writes files (rank 0, or no torchrun), else B."""
    return value if launched_rank() == 0 else otherwise


RESOLVERS = {"fraction_of": fraction_of, "neg_log": neg_log, "run_group": run_group, "main_process": main_process}
for _name, _fn in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for unknown top-level sections and keys a `_target_` does not accept."""
    for key in cfg:
        if key not in SECTIONS:
            raise ConfigError(f"Unknown config section {key!r}.{_suggest(key, SECTIONS)} Sections: {sorted(SECTIONS)}.")
    _validate_node(cfg, "")


def _validate_node(node, path: str) -> None:
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _validate_node(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        target = node["_target_"]
        try:
            params = inspect.signature(get_object(target)).parameters
        except Exception as e:
            raise ConfigError(f"{path}._target_={target!r} cannot be imported ({e}).") from e
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for key in node:
                if key not in params and key not in SPECIAL_KEYS:
                    raise ConfigError(
                        f"{path}.{key} is not an option of {target}.{_suggest(key, params)} "
                        f"Valid options: {sorted(params)}."
                    )
    for key in node:
        if key != "_target_":
            _validate_node(node._get_node(key), f"{path}.{key}" if path else str(key))


def build(node: DictConfig, path: str, **kwargs):
    """`instantiate(node, **kwargs)`, with our user-facing errors unwrapped from Hydra's."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise ConfigError(f"{path}: {cause}") from e
        raise
