"""Command-line entry points: a user's mistake is one paragraph on stderr and exit code 2; a bug
keeps its traceback (exit code 1).

Hydra reports its own errors -- a misspelt key or group option, an override it cannot parse --
by printing them and exiting with 1. With HYDRA_FULL_ERROR=1 it raises them instead, which is
how they reach `run_cli`; a user who set HYDRA_FULL_ERROR=1 gets every traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .config import CONFIG_DIR
from .errors import ConfigError

USER_ERRORS = (ConfigError, ConfigCompositionException, MissingConfigException, OverrideParseException,
               MissingMandatoryValue)  # fmt: skip


def run_cli(main: Callable[[], object], config_name: str = "train") -> None:
    """Call a `@hydra.main` function as a command: user errors exit with code 2."""
    global _tracebacks
    _tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    logging.captureWarnings(True)  # warnings reach the console and train.log through logging
    with exit_on_user_error(config_name):
        main()


_tracebacks = False  # the user asked for tracebacks (HYDRA_FULL_ERROR=1)


@contextmanager
def exit_on_user_error(config_name: str = "train"):
    """Inside a Hydra job (where Hydra would add its own lines) and around it: a user error
    becomes `error: <one paragraph>` on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        if _tracebacks:
            raise
        # the console only: a failed start leaves the run directory as it was, train.log included
        print(f"error: {explain(e, config_name)}", file=sys.stderr)
        sys.exit(2)


def one_paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _close(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def explain(error: Exception, config_name: str = "train") -> str:
    """The error as one paragraph that names the culprit and the fix."""
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        options = sorted(error.options)
        return (f"{group}={name}: there is no {name!r} in the config group {group!r}.{_close(name, options)} "
                f"Choose one of: {', '.join(options)}.")  # fmt: skip
    if isinstance(error, ConfigError):
        return one_paragraph(str(error))
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "a key"
        return f"{key} has no value and needs one: pass {key}=... on the command line."
    text = f"{error}\n{error.__cause__ or ''}".split("Config search path:")[0]
    text = text.split("Set the environment variable HYDRA_FULL_ERROR")[0]
    match = re.search(r"Could not override '([^']+)'", text)
    if isinstance(error, ConfigCompositionException) and match and "not in struct" in text:
        key = match.group(1)
        return (f"{key} is not a key of the config.{_suggest_key(key, config_name)} To add a new key, "
                f"write +{key}=...")  # fmt: skip
    if isinstance(error, OverrideParseException):
        return f"an override could not be parsed: {one_paragraph(text)}"
    return one_paragraph(text)


def _suggest_key(key: str, config_name: str) -> str:
    """Close spellings of `key` among its siblings in the config the other overrides compose."""
    others = [a for a in sys.argv[1:] if not a.startswith(("-", "hydra.", "hydra/", f"{key}=", f"+{key}="))]
    parent, _, leaf = key.rpartition(".")
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=others)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:  # the other overrides do not compose either: no suggestion
        return ""
    if not isinstance(node, DictConfig):
        return ""
    return _close(leaf, [str(k) for k in node if not str(k).startswith("_")], f"{parent}." if parent else "")
