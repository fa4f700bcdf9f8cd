"""Config plumbing: resolvers, start-up validation and building components from `_target_`.

Hydra already rejects misspelt command-line keys and group options. This module catches what
gets past it: a key in a YAML file (an experiment, say) that the target does not take, a value
of the wrong type for the target's annotation, a top-level section nobody reads, a model that
does not fit the data. Errors name the key and the closest valid spellings. Exceptions raised
while building a component are not rewritten: only checks that know the cause raise ConfigError.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import types
import typing
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .distributed import launched_rank
from .errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
SECTIONS = {"name", "task", "data", "model", "attention", "sigmoid", "optimizer", "schedule", "diagnostics", "logger",
            "trainer"}  # fmt: skip
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


def jobs_at_once(launcher: str) -> int | None:
    """`${jobs_at_once:${hydra.launcher._target_}}`: how many runs of a sweep submitit's local
    launcher starts at once (Hydra's `hydra.sweeper.max_batch_size`): one per GPU, else one per
    4 CPU cores (each training process uses several threads), at least one. Other launchers: no
    limit (the basic one runs one at a time anyway; SLURM has array_parallelism)."""
    if not launcher.endswith("LocalLauncher"):
        return None
    import torch  # only here: resolving a config must not need torch otherwise

    return torch.cuda.device_count() or max(1, (os.cpu_count() or 1) // 4)


RESOLVERS = {"fraction_of": fraction_of, "neg_log": neg_log, "run_group": run_group, "main_process": main_process,
             "jobs_at_once": jobs_at_once}  # fmt: skip
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
        _validate_target(node, path)
    for key in node:
        if key != "_target_":
            _validate_node(node._get_node(key), f"{path}.{key}" if path else str(key))


def _parameters(target: str, path: str) -> dict[str, inspect.Parameter]:
    try:
        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported ({e}).") from e
    try:
        return dict(inspect.signature(obj, eval_str=True).parameters)
    except NameError:  # an annotation that cannot be evaluated here: check names only
        return dict(inspect.signature(obj).parameters)


def _validate_target(node: DictConfig, path: str) -> None:
    """Every key is a parameter of the target, and every value fits the parameter's annotation."""
    target = node["_target_"]
    params = _parameters(target, path)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in SPECIAL_KEYS:
            continue
        if key not in params:
            if open_ended:
                continue
            raise ConfigError(
                f"{path}.{key} is not an option of {target}.{_suggest(key, params)} Valid options: {sorted(params)}."
            )
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}.{key}: {e.msg if hasattr(e, 'msg') else e}".splitlines()[0]) from None
        expected = _describe_mismatch(value, params[key].annotation)
        if expected:
            source = f" (from {node._get_node(key)._value()})" if OmegaConf.is_interpolation(node, key) else ""
            raise ConfigError(f"{path}.{key}={value!r}{source} must be {expected}.")


SIMPLE_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _describe_mismatch(value, annotation) -> str | None:
    """None if `value` fits `annotation` (or the annotation is not a simple one this can judge),
    else what it should be, e.g. "an integer or null"."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    options = tuple(typing.get_origin(o) or o for o in options)
    if not all(o in SIMPLE_TYPES or o in (list, tuple, dict) for o in options):
        return None
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)

    def fits(kind) -> bool:
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if kind is tuple:
            return isinstance(value, (list, tuple))
        return isinstance(value, kind)

    if any(fits(o) for o in options):
        return None
    names = {list: "a list", tuple: "a list", dict: "a mapping"} | SIMPLE_TYPES
    return " or ".join(dict.fromkeys(names[o] for o in options))


def build(node: DictConfig, argument_errors: tuple[type[Exception], ...] = (), **kwargs):
    """`instantiate(node, **kwargs)`, with our user-facing errors unwrapped from Hydra's; any
    other exception is a bug and keeps its traceback. `argument_errors`: exception types the
    target raises only to reject its arguments (optorch's ValueError): they become ConfigError
    naming the config section."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, argument_errors):
            raise ConfigError(f"{node._key()}: {cause}") from cause
        raise


def unused_sigmoid_options(cfg: DictConfig) -> str | None:
    """A note when the `sigmoid:` section is set but the backend is softmax, which ignores it
    (on purpose: a sweep over attention=softmax,sigmoid keeps an experiment's sigmoid recipe)."""
    if "sigmoid" not in cfg or "sigmoid" in str(cfg.attention.backend):
        return None
    changed = build(cfg.sigmoid).changed()
    if not changed:
        return None
    listed = ", ".join(f"sigmoid.{k}={v}" for k, v in changed.items())
    return f"attention.backend={cfg.attention.backend} is softmax attention: {listed} not used."


def check_model_fits_data(cfg: DictConfig, model_args: dict) -> None:
    """The data decides some model arguments (classes, image size, vocabulary, mel bins): the
    chosen model must take exactly those and need nothing else. Names the models that fit."""
    missing, unexpected = _misfit(cfg.model, model_args)
    if missing or unexpected:
        fitting = sorted(
            p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml") if not any(_misfit(OmegaConf.load(p), model_args))
        )
        reasons = [f"the model needs {sorted(missing)}, which the data does not give"] if missing else []
        reasons += [f"the data gives {sorted(unexpected)}, which the model does not take"] if unexpected else []
        raise ConfigError(
            f"model {cfg.model._target_} does not fit data {cfg.data._target_}: {' and '.join(reasons)}. Pick a "
            f"model for this data: model={' or model='.join(fitting)}."
        )


def check_positions(model, data) -> None:
    """A model with a table of absolute positions must cover the longest sequence the data will
    give it -- evaluation lengths included -- or the run would fail at its first evaluation."""
    limit, longest = getattr(model, "max_positions", None), getattr(data, "longest_sequence", None)
    if limit is not None and longest is not None and longest > limit:
        raise ConfigError(
            f"model.max_seq_len={limit} is the longest sequence model.pos_embed covers, but the data gives "
            f"{longest} tokens (data.seq_len, data.eval_seq_lens). Raise model.max_seq_len to {longest}, lower the "
            "lengths, or put positions in attention: model.pos_embed=none attention.position=rope (or alibi)."
        )


def _misfit(model_node: DictConfig, model_args: dict) -> tuple[set[str], set[str]]:
    """(required arguments nobody gives, data arguments the model does not take)."""
    params = _parameters(model_node._target_, "model")
    given = set(model_node) | set(model_args) | {"attention"}
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY}
    return required - given, set(model_args) - set(params)
