"""The statistics of `collect_sweep.py`: bootstrap intervals over seeds and evaluation examples,
differences between cells, and Wortsman et al. 2023's learning-rate sensitivity.

Every interval is a 95 % percentile bootstrap of 10 000 resamples from fixed generators. A cell
(one setting of the swept values but the seed) resamples its seeds; where the runs kept their
final evaluation's examples (RUN_DIR/eval_examples.parquet, written by the trainer), each
replicate also resamples the examples (a two-level bootstrap: the interval covers both the
run-to-run and the test-set noise), so even a single run gets an interval. Every run draws the
same examples in the same replicate, as they share one test set: its noise is not averaged away
over seeds, and it cancels in a difference between two cells (a paired comparison), while the
seeds of two cells are drawn independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

RESAMPLES = 10_000
EXAMPLES = "eval_examples.parquet"
EXAMPLE_SEED = 1  # the examples' draws (the seeds' come from the caller's generator)


def bootstrap_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the mean of `values` (the runs of one cell)."""
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    return interval(means)


def interval(replicates: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


def example_replicates(totals: np.ndarray, counts: np.ndarray, resamples: int = RESAMPLES,
                       chunk: int = 500) -> np.ndarray:  # fmt: skip
    """(resamples,) bootstrap replicates of a run's metric Σ total / Σ count, its examples drawn
    with replacement (a ratio of sums: CER is edits over reference characters, not a mean of
    per-utterance rates). The draws depend only on the number of examples: every run evaluated
    on the same examples gets the same draws, replicate by replicate (they share one test set)."""
    n, out = len(totals), []
    rng = np.random.default_rng(EXAMPLE_SEED)
    for start in range(0, resamples, chunk):  # chunks of draws bound the memory (n can be 10⁴)
        draws = rng.integers(0, n, (min(chunk, resamples - start), n))
        out.append(totals[draws].sum(1) / counts[draws].sum(1))
    return np.concatenate(out)


def run_examples(run_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's per-example (totals, counts) of `metric` ('eval/cer', or 'eval/cer@long_4x' on
    that split), or None if it kept none."""
    path = run_dir / EXAMPLES
    if not path.exists():
        return None
    name, at, split = metric.partition("@")
    frame = pd.read_parquet(path)
    frame = frame[frame["split"] == at + split]
    if name not in frame or frame.empty:
        return None
    return frame[name].to_numpy(float), frame[f"{name} count"].to_numpy(float)


def cell_replicates(group: pd.DataFrame, metric: str, root: Path, rng: np.random.Generator) -> np.ndarray | None:
    """(RESAMPLES,) bootstrap replicates of a cell's mean metric over its finite runs: seeds drawn
    with replacement, and within each drawn seed its examples when every run kept them. None
    when the cell has no finite run."""
    finite = group[np.isfinite(group[metric].to_numpy(float))]
    if finite.empty:
        return None
    per_run = [run_examples(root / run, metric) for run in finite["run"]]
    seeds = rng.integers(0, len(finite), (RESAMPLES, len(finite)))
    if all(e is not None for e in per_run):
        runs = np.stack([example_replicates(*e) for e in per_run])  # (runs, RESAMPLES)
        return runs[seeds, np.arange(RESAMPLES)[:, None]].mean(1)
    return finite[metric].to_numpy(float)[seeds].mean(1)


def learning_rate_sensitivity(runs: pd.DataFrame, x_key: str, variants: list[str], seed_key: str,
                              metric: str) -> pd.DataFrame:  # fmt: skip
    """Wortsman et al. 2023's learning-rate sensitivity of each variant (the swept values but the
    learning rate `x_key` and the seed; a learning rate that was not swept is a grid of one): the
    mean over the grid of min(loss(η), loss at init) − the best loss over the grid, where a run
    whose final loss is not finite counts as the loss at init. Computed per seed (seeds that
    ran the whole grid), then mean ± std and a bootstrap interval over seeds. The loss at init
    is each run's first logged `train/loss_init`.

    Also per variant: the best learning rate (lowest loss, mean over seeds), runs that `diverged`
    (final loss not finite, or no lower than at init) and runs with a `spike` (after the first
    tenth of training the loss came back to its value at init, `train/loss_peak`)."""
    runs = runs.assign(_final=runs[metric].astype(float), _init=runs["train/loss_init"].astype(float))
    runs["_clipped"] = np.where(np.isfinite(runs["_final"]), np.minimum(runs["_final"], runs["_init"]), runs["_init"])
    grid = sorted(runs[x_key].unique(), key=float)
    rows = []
    groups = runs.groupby(variants, sort=False, dropna=False) if variants else [((), runs)]
    for values, group in groups:
        per_seed = []
        for _, seed_runs in group.groupby(seed_key) if seed_key in group else [(0, group)]:
            losses = seed_runs.groupby(x_key)["_clipped"].mean()
            if len(losses) == len(grid):
                per_seed.append(float((losses - losses.min()).mean()))
        means = group.groupby(x_key)["_clipped"].mean()
        per_seed = np.array(per_seed)
        low, high = bootstrap_interval(per_seed) if len(per_seed) else (np.nan, np.nan)
        rows.append({
            **dict(zip(variants, values if isinstance(values, tuple) else (values,))),
            **{f"{x_key}={lr}": means.get(lr, np.nan) for lr in grid},
            "sensitivity": per_seed.mean() if len(per_seed) else np.nan,
            "sensitivity std": per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan,
            "sensitivity low": low, "sensitivity high": high, "seeds": len(per_seed),
            "best": means.idxmin(),
            "diverged": int((~np.isfinite(group["_final"]) | (group["_final"] >= group["_init"])).sum()),
            "spikes": int((group["train/loss_peak"].astype(float) >= group["_init"]).sum()),
            "runs": len(group),
        })  # fmt: skip
    return pd.DataFrame(rows)


def loss_landmarks(frame: pd.DataFrame) -> dict[str, float]:
    """`train/loss_init` (the first logged training loss: the loss before the first update) and
    `train/loss_peak` (the highest after the first tenth of the run; inf if one was not finite)."""
    if "train/loss" not in frame:
        return {}
    logged = frame.drop(columns=["train/loss"]).filter(like="train/").notna().any(axis=1) | frame["train/loss"].notna()
    losses = frame[logged][["step", "train/loss"]]  # the training rows, a NaN loss included
    late = losses[losses["step"] > losses["step"].max() / 10]["train/loss"].to_numpy(float)
    peak = np.inf if not np.isfinite(late).all() else (late.max() if len(late) else np.nan)
    return {"train/loss_init": float(losses["train/loss"].iloc[0]), "train/loss_peak": float(peak)}
