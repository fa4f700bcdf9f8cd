"""Metric sinks: W&B, metrics.parquet and the console.

Every sink has `log(step, metrics)`, `flush()` and `close()`; `Tracker` fans out to them and
turns a sink's failure into one warning, after which that sink is dropped and training goes on.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


class ParquetSink:
    """One row per logged step, every key a column; rewritten atomically on flush."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[int, dict[str, Any]] = {}

    def resume(self, step: int):
        """Keep the rows of an earlier run up to `step` (later ones will be logged again)."""
        if self.path.exists():
            frame = pd.read_parquet(self.path)
            for row in frame[frame["step"] <= step].to_dict("records"):
                self.rows[int(row["step"])] = {k: v for k, v in row.items() if pd.notna(v)}

    def log(self, step: int, metrics: dict[str, float]):
        self.rows.setdefault(step, {"step": step}).update(metrics)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.rows[s] for s in sorted(self.rows)])

    def flush(self):
        if self.rows:
            tmp = self.path.with_suffix(".parquet.tmp")
            self.frame().to_parquet(tmp, index=False)
            os.replace(tmp, self.path)

    def close(self):
        self.flush()


def final_values(path: Path) -> dict[str, float]:
    """The last logged value of every metric in a metrics.parquet (none if it does not exist)."""
    if not Path(path).exists():
        return {}
    frame = pd.read_parquet(path)
    return {k: frame[k].dropna().iloc[-1] for k in frame.columns if k != "step" and frame[k].notna().any()}


class ConsoleSink:
    """Prints evaluation results (the progress bar shows training metrics)."""

    def log(self, step: int, metrics: dict[str, float]):
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            log.info(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items()))
        for key, text in metrics.items():
            if isinstance(text, str):
                log.info(f"{key}: {text!r}")

    def flush(self):
        pass

    def close(self):
        pass


class WandbSink:
    """A W&B run under `<run_dir>/wandb`: offline unless WANDB_MODE or `mode` says online.

    The run's id is kept in `<run_dir>/wandb/run_id`: a run resumed in the same directory (a
    later job of a split run, a restart) continues the same W&B run (offline, each job adds an
    `offline-run-*-<id>` folder; `wandb sync` appends them to one run)."""

    def __init__(self, run_dir: Path, config: dict, *, mode: str, project: str, entity=None, group=None, tags=(),
                 name=None):  # fmt: skip
        import wandb

        id_file = Path(run_dir) / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE") or mode,
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            name=name,
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.wandb, self.texts = wandb, []

    def log(self, step: int, metrics: dict[str, float]):
        texts = [(key, value) for key, value in metrics.items() if isinstance(value, str)]
        if texts:  # one table of every text so far (step, key, text): W&B shows text best that way
            self.texts += [[step, key, value] for key, value in texts]
            table = self.wandb.Table(columns=["step", "key", "text"], data=self.texts)
            metrics = {k: v for k, v in metrics.items() if not isinstance(v, str)} | {"samples/table": table}
        self.run.log(metrics, step=step)

    def flush(self):
        pass

    def close(self):
        self.run.finish()


class Tracker:
    """Fans metrics out to sinks; a failing sink warns once and is dropped."""

    def __init__(self, sinks: dict[str, Any]):
        self.sinks = dict(sinks)

    def _each(self, method: str, *args):
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # a logging failure must never stop training
                warnings.warn(
                    f"metrics sink {name!r} failed ({type(e).__name__}: {e}); continuing without it.", stacklevel=2
                )
                del self.sinks[name]

    def log(self, step: int, metrics: dict[str, float]):
        self._each("log", step, metrics)

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")

    @property
    def parquet(self) -> ParquetSink | None:
        return self.sinks.get("parquet")


def build_tracker(
    run_dir: Path,
    config: dict,
    *,
    wandb: bool = True,
    mode: str = "offline",
    project: str = "attention-simulator",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] = (),
    name: str | None = None,
    parquet: bool = True,
    console: bool = True,
) -> Tracker:
    """The sinks the `logger` config asks for; W&B failing to start warns and is skipped."""
    sinks: dict[str, Any] = {}
    if parquet:
        sinks["parquet"] = ParquetSink(Path(run_dir) / "metrics.parquet")
    if console:
        sinks["console"] = ConsoleSink()
    if wandb and mode != "disabled":
        try:
            sinks["wandb"] = WandbSink(
                Path(run_dir), config, mode=mode, project=project, entity=entity, group=group, tags=tags, name=name,
            )  # fmt: skip
        except Exception as e:
            warnings.warn(f"W&B could not start ({type(e).__name__}: {e}); training without it.", stacklevel=2)
    return Tracker(sinks)
