"""End-of-run figures, drawn from the run's metrics.parquet (so they can be redrawn later)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _curve(ax, frame: pd.DataFrame, key: str, label: str):
    if key in frame:
        rows = frame[["step", key]].dropna()
        ax.plot(rows["step"], rows[key], marker="o" if key.startswith("eval/") else None, ms=3, label=label)


def write_report(run_dir: Path, main_metric: str) -> dict[str, float]:
    """Write report/curves.png (loss and the task's main metric, train and eval); return the
    final value of every metric."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.exists():
        return {}
    frame = pd.read_parquet(path)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", main_metric)):
        _curve(ax, frame, f"train/{metric}", "train")
        _curve(ax, frame, f"eval/{metric}", "eval")
        ax.set(xlabel="step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(Path(run_dir).name)
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return {k: frame[k].dropna().iloc[-1] for k in frame.columns if k != "step" and frame[k].notna().any()}
