"""Tabulate a sweep: every run's overrides against its final metrics, with intervals.

    python scripts/collect_sweep.py multirun/vit_sigmoid/2026-11-23_10-00-00 [MORE_DIRS ...] [--out DIR]
        [--metric eval/accuracy ...] [--baseline sigmoid.bias=auto] [--sensitivity]
        [--curves 'attn/block_*/logit_max' train/loss [--curves-at optimizer.learning_rate=0.1]]

Reads each run directory under MULTIRUN_DIR, or under several as one sweep (any depth: a
`.hydra/overrides.yaml` beside a `metrics.parquet`), keeps the overrides that differ between
runs, and takes each metric's last logged value. Prints a markdown table (one row per run,
sorted by the swept values) and writes
`sweep.csv`, `sweep.md` and `sweep.png` (the main metric against the first swept key, one line
per value of the others, mean ± std over seeds when `trainer.seed` is swept; runs whose metric
is not finite marked as diverged) to --out (default: the first MULTIRUN_DIR).
A per-layer statistic's mean over layers is a metric too: `--metric lipschitz/layer_mean/spectral_max`.

Each cell (the swept values but the seed) gets statistics of each --metric and the training
loss, printed and written to `sweep_summary.md` / `.csv`: the finite runs, the mean, the
standard deviation over seeds, and a 95 % bootstrap interval of the mean (`sweep_stats.py`: over
the seeds, and over each run's evaluation examples where the runs kept them, so a single run
has one too). `--baseline K=V`
adds each cell's difference from the cell with K=V (the other keys equal) with its interval:
an interval that covers 0 is a difference this sweep cannot detect.

`--sensitivity` writes `sweep_sensitivity.md` / `.csv`: Wortsman et al. 2023's learning-rate
sensitivity of each variant over `optimizer.learning_rate`. `--curves KEY ...` draws
`sweep_curves.png`: each KEY (a glob over the logged metrics) over steps, one panel each, for
the runs at --curves-at KEY=VALUE (default: the largest value of the first swept key).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from compare_runs import markdown_table, with_layer_means
from omegaconf import OmegaConf
from sweep_stats import cell_replicates, interval, learning_rate_sensitivity, loss_landmarks

from attention_simulator.cli import exit_on_user_error
from attention_simulator.errors import ConfigError

SEED = "trainer.seed"
LR = "optimizer.learning_rate"


def read_runs(dirs: list[Path], root: Path) -> pd.DataFrame:
    """One row per run under `dirs`: its folder relative to `root`, its overrides (key -> value)
    and the last value of every metric."""
    rows = []
    for metrics in sorted(path for directory in dirs for path in directory.resolve().rglob("metrics.parquet")):
        overrides_file = metrics.parent / ".hydra" / "overrides.yaml"
        if not overrides_file.exists():
            continue
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(overrides_file))
        frame = with_layer_means(pd.read_parquet(metrics))
        last = {k: frame[k].dropna().iloc[-1] for k in frame if k != "step" and frame[k].notna().any()}
        numeric = {k: v for k, v in last.items() if not isinstance(v, str)} | loss_landmarks(frame)
        rows.append({"run": str(metrics.parent.relative_to(root)), **overrides, "step": frame["step"].max(), **numeric})
    if not rows:
        where = ", ".join(map(str, dirs))
        raise ConfigError(f"no run directories (.hydra/overrides.yaml + metrics.parquet) under {where}")
    return pd.DataFrame(rows)


def swept_keys(runs: pd.DataFrame, metric_columns: list[str]) -> list[str]:
    """Override keys whose value differs between runs."""
    keys = [c for c in runs.columns if c not in metric_columns and c not in ("run", "step")]
    return [k for k in keys if runs[k].astype(str).nunique() > 1]


def _scalar(value):
    """numpy numbers as Python ones (so floats print to 4 significant digits)."""
    return value.item() if hasattr(value, "item") else value


def _sort_value(value):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def table(runs: pd.DataFrame, swept: list[str], metrics: list[str]) -> pd.DataFrame:
    out = runs[swept + ["step"] + metrics]
    return out.iloc[sorted(range(len(out)), key=lambda i: [_sort_value(out.iloc[i][k]) for k in swept])]


def cells_of(runs: pd.DataFrame, swept: list[str]):
    """(the cell's swept values but the seed, its runs) for each cell."""
    cells = [k for k in swept if k != SEED]
    for values, group in runs.groupby(cells, sort=False, dropna=False) if cells else [((), runs)]:
        yield dict(zip(cells, values if isinstance(values, tuple) else (values,))), group


def summary(runs: pd.DataFrame, swept: list[str], metrics: list[str], root: Path,
            baseline: tuple[str, str] | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per cell: for each metric the finite runs `n`, the `mean`, `std` over seeds (n − 1
    in the denominator) and the bootstrap interval `low` … `high`; with a baseline (key, value)
    also `delta`, the difference from the mean of the baseline's cell (the same other keys), and
    its interval `delta low` … `delta high` (paired over the examples both cells evaluate, the
    seeds of each drawn independently)."""
    rng = np.random.default_rng(0)
    keys = [k for k in swept if k != SEED]
    rows, replicates = [], {}
    for cell, group in cells_of(runs, swept):
        row = dict(cell)
        for metric in metrics:
            x = group[metric].to_numpy(float)
            x = x[np.isfinite(x)]
            reps = replicates[_cell_id(cell, keys), metric] = cell_replicates(group, metric, root, rng)
            low, high = interval(reps) if reps is not None else (np.nan, np.nan)
            row |= {f"{metric} n": len(x), f"{metric} mean": x.mean() if len(x) else np.nan,
                    f"{metric} std": x.std(ddof=1) if len(x) > 1 else np.nan, f"{metric} low": low,
                    f"{metric} high": high}  # fmt: skip
        rows.append(row)
    if baseline:
        key, value = baseline
        means = {_cell_id(row, keys): row for row in rows}
        for row in rows:
            base = _cell_id(row | {key: value}, keys)
            for metric in metrics:
                mine, theirs = replicates[_cell_id(row, keys), metric], replicates.get((base, metric))
                if mine is not None and theirs is not None:
                    low, high = interval(mine - theirs)
                    row |= {f"{metric} delta": row[f"{metric} mean"] - means[base][f"{metric} mean"],
                            f"{metric} delta low": low, f"{metric} delta high": high}  # fmt: skip
    out = pd.DataFrame(rows)
    return out.iloc[sorted(range(len(out)), key=lambda i: [_sort_value(out.iloc[i][k]) for k in keys])]


def _cell_id(cell: dict, keys: list[str]) -> tuple[str, ...]:
    return tuple(str(cell[k]) for k in keys)


def summary_markdown(cells: pd.DataFrame, keys: list[str], metrics: list[str]) -> str:
    """The summary as `mean ± std [low, high] (runs)` per metric (no ± for a single run), and
    `delta [low, high]` from the baseline where there is one."""

    def stats(row, m):
        spread = f" ± {row[f'{m} std']:.2g}" if row[f"{m} n"] > 1 else ""
        return f"{row[f'{m} mean']:.4g}{spread} [{row[f'{m} low']:.4g}, {row[f'{m} high']:.4g}] ({int(row[f'{m} n'])})"

    def delta(row, m):
        value = row.get(f"{m} delta", np.nan)
        return "" if pd.isna(value) else f"{value:+.3g} [{row[f'{m} delta low']:+.3g}, {row[f'{m} delta high']:+.3g}]"

    deltas = [m for m in metrics if f"{m} delta" in cells]
    header = [*keys, *(f"{m}: mean ± std [95 % interval] (runs)" for m in metrics), *(f"{m}: Δ [95 %]" for m in deltas)]
    rows = [[_scalar(row[k]) for k in keys] + [stats(row, m) for m in metrics] + [delta(row, m) for m in deltas]
            for _, row in cells.iterrows()]  # fmt: skip
    return markdown_table(header, rows)


def _numeric(values) -> bool:
    return all(_sort_value(v)[0] == 0 for v in values)


def plot(runs: pd.DataFrame, swept: list[str], metric: str, path: Path):
    """The metric against the first swept key (seeds averaged), one line per other setting; a
    numeric key spanning a decade or more on a log axis. A run whose metric is not finite
    (it diverged) is left out of the mean and marked × at the top of the figure."""
    x_key = next((k for k in swept if k != SEED), swept[0])
    others = [k for k in swept if k not in (x_key, SEED)]
    numeric = _numeric(runs[x_key])
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = runs.groupby(others, dropna=False) if others else [((), runs)]
    diverged_any = False
    for label, group in groups:
        finite = group[metric].astype(float).map(math.isfinite)
        stats = group[finite].groupby(x_key)[metric].agg(["mean", "std"]).reset_index()
        stats = stats.iloc[sorted(range(len(stats)), key=lambda i: _sort_value(stats[x_key].iloc[i]))]
        xs = [float(v) if numeric else str(v) for v in stats[x_key]]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
        line = ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=name or None)
        diverged = group[~finite][x_key].unique()
        if len(diverged):
            diverged_any = True
            xs = [float(v) if numeric else str(v) for v in diverged]
            ax.plot(xs, [1.0] * len(xs), "x", ms=9, clip_on=False, color=line[0].get_color(),
                    transform=ax.get_xaxis_transform())  # fmt: skip
    values = [float(v) for v in runs[x_key]] if numeric else []
    if numeric and min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric + (" (mean ± std over seeds)" if SEED in swept else ""))
    if diverged_any:
        ax.set_title("× at the top: a run that diverged (non-finite)", fontsize=9)
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(root: Path, runs: pd.DataFrame, swept: list[str], patterns: list[str], at: str | None, path: Path):
    """Each metric matching `patterns` (globs: 'attn/block_*/logit_max') over training steps, one
    panel each, for the runs at `at` (KEY=VALUE; default: the largest value of the first swept
    key): one colour per other setting, one line per seed (absolute values, log scale)."""
    x_key, _, wanted = at.partition("=") if at else (next((k for k in swept if k != SEED), swept[0]), "", None)
    if x_key not in runs:
        raise ConfigError(f"--curves-at {at}: no run set {x_key!r}; give KEY=VALUE of an override, e.g. {swept[0]}=...")
    values = {_sort_value(v): v for v in runs[x_key]}
    chosen = values.get(_sort_value(wanted)) if wanted is not None else values[max(values)]
    if chosen is None:
        raise ConfigError(f"--curves-at {at}: {x_key} took the values {sorted(map(str, values.values()))}.")
    others = [k for k in swept if k not in (x_key, SEED)]
    frames = {run["run"]: pd.read_parquet(root / run["run"] / "metrics.parquet") for _, run in runs.iterrows()
              if str(run[x_key]) == str(chosen)}  # fmt: skip
    logged = sorted(set().union(*(frame.columns for frame in frames.values())))
    keys = []
    for pattern in patterns:
        matched = [k for k in logged if fnmatch.fnmatchcase(k, pattern)]
        if not matched:
            raise ConfigError(f"no run logged {pattern!r}: pick --curves from the metrics.parquet columns.")
        keys += [k for k in matched if k not in keys]
    cols = min(3, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4.6 * cols, 3.4 * -(-len(keys) // cols)),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    colours = {}
    for _, run in runs[runs["run"].isin(frames)].iterrows():
        name = ", ".join(f"{k}={run[k]}" for k in others) or run["run"]
        colour = colours.setdefault(name, f"C{len(colours)}")
        for i, (ax, key) in enumerate(zip(axes.flat, keys)):
            if key in frames[run["run"]]:
                points = frames[run["run"]][["step", key]].dropna()
                first = i == 0 and name not in {line.get_label() for line in ax.lines}
                ax.plot(points["step"], points[key].abs(), color=colour, lw=1, label=name if first else None)
    for ax, key in zip(axes.flat, keys):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{x_key}={chosen}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dirs", type=Path, nargs="+", metavar="MULTIRUN_DIR",
                        help="one sweep's folder, or several: their runs in one table")  # fmt: skip
    parser.add_argument("--metric", nargs="+", help="the main metric, or several: the first is plotted, all are "
                        "summarised (default: the first of eval/accuracy, eval/bits_per_byte, eval/wer, eval/loss that "
                        "the runs have)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="where the tables and figures go (default: the first MULTIRUN_DIR)")
    parser.add_argument("--baseline", metavar="KEY=VALUE",
                        help="also each cell's difference from the cell with KEY=VALUE, with its interval")  # fmt: skip
    parser.add_argument("--sensitivity", action="store_true",
                        help="Wortsman et al. 2023's learning-rate sensitivity of each variant over the first swept "
                             "key, to sweep_sensitivity.md / .csv")  # fmt: skip
    parser.add_argument("--curves", nargs="+", metavar="KEY",
                        help="also plot these metrics (globs) over steps for the runs at one value of the first "
                             "swept key, to sweep_curves.png")  # fmt: skip
    parser.add_argument(
        "--curves-at",
        metavar="KEY=VALUE",
        help="the runs to draw (default: those at the largest value of the first swept key)",
    )
    args = parser.parse_args(argv)
    root = Path(os.path.commonpath([d.resolve() for d in args.multirun_dirs]))
    runs = read_runs(args.multirun_dirs, root)
    metrics = [c for c in runs.columns if "/" in c and not c.startswith(("param/", "grad/", "update", "opt/"))]
    metrics = [m for m in metrics if m.startswith("eval/") and "/block_" not in m] + ["train/loss"]
    preferred = ("eval/accuracy", "eval/bits_per_byte", "eval/wer", "eval/loss")
    chosen = args.metric or [next(m for m in (*preferred, *metrics) if m in runs)]
    for name in chosen:
        if name not in runs:
            raise ConfigError(f"no run logged {name!r}; metrics: {metrics}")
    metric = chosen[0]
    swept = swept_keys(runs, [c for c in runs.columns if "/" in c])
    if not swept:  # one run, or runs that differ in nothing: a row per run directory
        print("no override differs between the runs: one row per run", file=sys.stderr)
        swept = ["run"]
    baseline = _baseline(args.baseline, runs, swept)
    result = table(runs, swept, [m for m in metrics if m in runs])
    out = args.out or args.multirun_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(
        list(result.columns), [[_scalar(v) for v in row] for row in result.itertuples(index=False)]
    )
    print(markdown)
    (out / "sweep.md").write_text(markdown)
    result.to_csv(out / "sweep.csv", index=False)
    plot(runs, swept, metric, out / "sweep.png")
    shown = list(dict.fromkeys([*chosen, "train/loss"]))
    cells = summary(runs, swept, shown, root, baseline)
    text = summary_markdown(cells, [k for k in swept if k != SEED], shown)
    print("\nper cell (95 % bootstrap intervals):\n" + text)
    (out / "sweep_summary.md").write_text(text)
    cells.to_csv(out / "sweep_summary.csv", index=False)
    if args.sensitivity:
        if LR not in runs:
            raise ConfigError(f"--sensitivity: no run set {LR}; sweep it (e.g. {LR}=1e-3,1e-2,1e-1).")
        sensitivity = learning_rate_sensitivity(runs, LR, [k for k in swept if k not in (LR, SEED)], SEED, metric)
        text = markdown_table(list(sensitivity.columns), [[_scalar(v) for v in row] for row in sensitivity.values])
        print(f"\nlearning-rate sensitivity ({metric}):\n" + text)
        (out / "sweep_sensitivity.md").write_text(text)
        sensitivity.to_csv(out / "sweep_sensitivity.csv", index=False)
    if args.curves:
        plot_curves(root, runs, swept, args.curves, args.curves_at, out / "sweep_curves.png")
    print(f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'} ({metric})", file=sys.stderr)
    return result


def _baseline(option: str | None, runs: pd.DataFrame, swept: list[str]) -> tuple[str, str] | None:
    if option is None:
        return None
    key, _, value = option.partition("=")
    if key not in swept or key == SEED or value not in set(runs[key].astype(str)):
        choices = {k: sorted(set(runs[k].astype(str))) for k in swept if k != SEED}
        raise ConfigError(f"--baseline {option}: give KEY=VALUE of a swept key and a value it took: {choices}")
    return key, value


if __name__ == "__main__":
    with exit_on_user_error():
        main()
