"""Tabulate a sweep: every run's overrides against its final metrics.

    python scripts/collect_sweep.py multirun/vit_sigmoid/2026-11-23_10-00-00 [--metric eval/accuracy] [--out DIR]

Reads each run directory under MULTIRUN_DIR (any depth: a `.hydra/overrides.yaml` beside a
`metrics.parquet`), keeps the overrides that differ between runs, and takes each metric's last
logged value. Prints a markdown table (one row per run, sorted by the swept values) and writes
`sweep.csv`, `sweep.md` and `sweep.png` (the main metric against the first swept key, one line
per value of the others, mean ± std over seeds when `trainer.seed` is swept) to --out
(default: MULTIRUN_DIR).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from compare_runs import markdown_table  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from attention_simulator.cli import exit_on_user_error  # noqa: E402
from attention_simulator.errors import ConfigError  # noqa: E402

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


def plot(runs: pd.DataFrame, swept: list[str], metric: str, path: Path):
    """The metric against the first swept key (seeds averaged), one line per other setting."""
    x_key = next((k for k in swept if k != SEED), swept[0])
    others = [k for k in swept if k not in (x_key, SEED)]
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = runs.groupby(others, dropna=False) if others else [((), runs)]
    for label, group in groups:
        stats = group.groupby(x_key)[metric].agg(["mean", "std", "count"]).reset_index()
        order = sorted(range(len(stats)), key=lambda i: _sort_value(stats[x_key].iloc[i]))
        stats = stats.iloc[order]
        xs = [str(v) for v in stats[x_key]]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
        ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=name or None)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric + (" (mean ± std over seeds)" if SEED in swept else ""))
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--metric", help="the main metric (default: the first eval/ metric of eval/accuracy, "
                                         "eval/bits_per_byte, eval/wer, eval/loss that the runs have)")  # fmt: skip
    parser.add_argument("--out", type=Path)
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
    print(f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'} ({metric})", file=sys.stderr)
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        main()
