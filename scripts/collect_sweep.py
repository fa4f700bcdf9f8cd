"""Tabulate a sweep: every run's overrides against its final metrics.

    python scripts/collect_sweep.py multirun/vit_sigmoid/2026-11-23_10-00-00 [--metric eval/accuracy] [--out DIR]
        [--curves train/grad_norm]

Reads each run directory under MULTIRUN_DIR (any depth: a `.hydra/overrides.yaml` beside a
`metrics.parquet`), keeps the overrides that differ between runs, and takes each metric's last
logged value. Prints a markdown table (one row per run, sorted by the swept values) and writes
`sweep.csv`, `sweep.md` and `sweep.png` (the main metric against the first swept key, one line
per value of the others, mean ± std over seeds when `trainer.seed` is swept; runs whose metric
is not finite marked as diverged) to --out (default: MULTIRUN_DIR). `--curves KEY` also draws
`sweep_curves.png`: KEY over steps for every run at the largest value of the first swept key.

When `trainer.seed` is swept, each cell (the other swept values) also gets its statistics over
seeds, printed and written to `sweep_summary.md` / `.csv`: the number of finite runs, the mean,
the standard deviation, and a 95 % percentile-bootstrap interval of the mean (10 000 resamples
of the seeds, a fixed generator). With few seeds the interval is as wide as they are apart: two
seeds give their range.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from compare_runs import markdown_table
from omegaconf import OmegaConf

from attention_simulator.cli import exit_on_user_error
from attention_simulator.errors import ConfigError

SEED = "trainer.seed"


def read_runs(root: Path) -> pd.DataFrame:
    """One row per run: its overrides (key -> value) and the last value of every metric."""
    rows = []
    for metrics in sorted(root.rglob("metrics.parquet")):
        overrides_file = metrics.parent / ".hydra" / "overrides.yaml"
        if not overrides_file.exists():
            continue
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(overrides_file))
        frame = pd.read_parquet(metrics)
        last = {k: frame[k].dropna().iloc[-1] for k in frame if k != "step" and frame[k].notna().any()}
        numeric = {k: v for k, v in last.items() if not isinstance(v, str)}
        rows.append({"run": str(metrics.parent.relative_to(root)), **overrides, "step": frame["step"].max(), **numeric})
    if not rows:
        raise ConfigError(f"no run directories (.hydra/overrides.yaml + metrics.parquet) under {root}")
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


def bootstrap_interval(values: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the mean of `values` (the runs of one cell)."""
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summary(runs: pd.DataFrame, swept: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per cell (the swept values but the seed): for each metric the finite runs `n`, the
    `mean`, `std` (n − 1 in the denominator) and the bootstrap interval `low` … `high`."""
    cells = [k for k in swept if k != SEED]
    groups = runs.groupby(cells, sort=False, dropna=False) if cells else [((), runs)]
    rows = []
    for values, group in groups:
        row = dict(zip(cells, values if isinstance(values, tuple) else (values,)))
        for metric in metrics:
            x = group[metric].to_numpy(float)
            x = x[np.isfinite(x)]
            std = x.std(ddof=1) if len(x) > 1 else float("nan")
            low, high = bootstrap_interval(x) if len(x) else (float("nan"), float("nan"))
            row |= {f"{metric} n": len(x), f"{metric} mean": x.mean() if len(x) else float("nan"),
                    f"{metric} std": std, f"{metric} low": low, f"{metric} high": high}  # fmt: skip
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.iloc[sorted(range(len(out)), key=lambda i: [_sort_value(out.iloc[i][k]) for k in cells])]


def summary_markdown(cells: pd.DataFrame, metrics: list[str]) -> str:
    """The summary as `mean ± std [low, high] (n)` per metric."""
    keys = [c for c in cells.columns if not c.endswith((" n", " mean", " std", " low", " high"))]
    rows = [[_scalar(row[k]) for k in keys] + [f"{row[f'{m} mean']:.4g} ± {row[f'{m} std']:.2g} "
                                               f"[{row[f'{m} low']:.4g}, {row[f'{m} high']:.4g}] ({row[f'{m} n']})"
                                               for m in metrics]
            for _, row in cells.iterrows()]  # fmt: skip
    return markdown_table(keys + [f"{m}: mean ± std [95 % interval] (runs)" for m in metrics], rows)


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


def plot_curves(root: Path, runs: pd.DataFrame, swept: list[str], key: str, path: Path):
    """`key` over training steps for the runs at the largest value of the first swept key: one
    colour per other setting, one line per seed (absolute values, log scale)."""
    x_key = next((k for k in swept if k != SEED), swept[0])
    top = max(runs[x_key], key=_sort_value)
    others = [k for k in swept if k not in (x_key, SEED)]
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for _, run in runs[runs[x_key] == top].iterrows():
        frame = pd.read_parquet(root / run["run"] / "metrics.parquet")
        if key not in frame:
            raise ConfigError(f"run {run['run']} logged no {key!r}: pick --curves from its metrics.parquet columns.")
        frame = frame[["step", key]].dropna()
        name = ", ".join(f"{k}={run[k]}" for k in others) or run["run"]
        first = name not in colours
        colour = colours.setdefault(name, f"C{len(colours)}")
        ax.plot(frame["step"], frame[key].abs(), color=colour, lw=1, label=name if first else None)
    ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{x_key}={top}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--metric", help="the main metric (default: the first eval/ metric of eval/accuracy, "
                                         "eval/bits_per_byte, eval/wer, eval/loss that the runs have)")  # fmt: skip
    parser.add_argument("--out", type=Path)
    parser.add_argument("--curves", help="also plot this metric over steps for the runs at the largest value of the "
                                         "first swept key (e.g. train/grad_norm), to sweep_curves.png")  # fmt: skip
    args = parser.parse_args(argv)
    runs = read_runs(args.multirun_dir)
    metrics = [c for c in runs.columns if "/" in c and not c.startswith(("param/", "grad/", "update", "opt/"))]
    metrics = [m for m in metrics if m.startswith("eval/") and "/block_" not in m] + ["train/loss"]
    preferred = ("eval/accuracy", "eval/bits_per_byte", "eval/wer", "eval/loss")
    metric = args.metric or next(m for m in (*preferred, *metrics) if m in runs)
    if metric not in runs:
        raise ConfigError(f"no run logged {metric!r}; metrics: {metrics}")
    swept = swept_keys(runs, [c for c in runs.columns if "/" in c])
    if not swept:  # one run, or runs that differ in nothing: a row per run directory
        print("no override differs between the runs: one row per run", file=sys.stderr)
        swept = ["run"]
    result = table(runs, swept, [m for m in metrics if m in runs])
    out = args.out or args.multirun_dir
    out.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(
        list(result.columns), [[_scalar(v) for v in row] for row in result.itertuples(index=False)]
    )
    print(markdown)
    (out / "sweep.md").write_text(markdown)
    result.to_csv(out / "sweep.csv", index=False)
    plot(runs, swept, metric, out / "sweep.png")
    if SEED in swept:
        cells = summary(runs, swept, [m for m in metrics if m in runs])
        text = summary_markdown(cells, [metric, "train/loss"] if metric != "train/loss" else [metric])
        print("\nover seeds:\n" + text)
        (out / "sweep_summary.md").write_text(text)
        cells.to_csv(out / "sweep_summary.csv", index=False)
    if args.curves:
        plot_curves(args.multirun_dir, runs, swept, args.curves, out / "sweep_curves.png")
    print(f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'} ({metric})", file=sys.stderr)
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        main()
