"""User-facing errors: a bad config, a missing dataset, an unusable checkpoint.

The entry point prints these as one paragraph (no traceback) and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """An option, or combination of options, that cannot work; the message names the fix."""


class DatasetUnavailableError(ConfigError, FileNotFoundError):
    """A dataset could not be found locally or downloaded."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete or corrupt."""
