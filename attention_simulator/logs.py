"""Console output goes through `logging`, so Hydra's `train.log` holds what the console showed.

Configured by `configs/hydra/job_logging/console_and_file.yaml`: messages alone on the console,
written above tqdm's progress bar instead of through it, and with a time stamp in the run's log
file. Warnings (a skipped checkpoint, a W&B failure) are routed to the same handlers.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes above tqdm's progress bars instead of through them."""

    def emit(self, record: logging.LogRecord):
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's own convention: report, never raise from a handler
            self.handleError(record)


def to_log_files(message: str, exc_info: BaseException | None = None):
    """Write an error the console already shows (the traceback Python prints for a crash) to the
    run's log file too, and to nothing else."""
    record = logging.LogRecord("attention_simulator", logging.ERROR, __file__, 0, message, None,
                               (type(exc_info), exc_info, exc_info.__traceback__) if exc_info else None)  # fmt: skip
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
