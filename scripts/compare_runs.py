"""Overlay runs (e.g. softmax vs sigmoid) for the key statistics.

    python scripts/compare_runs.py RUN_DIR RUN_DIR ... [--out DIR]

Reads each run's metrics.parquet and .hydra/config.yaml; writes DIR/compare.png (loss, eval
metrics, and layer-averaged attention mass, attention-output norm and residual norm over steps,
the gradient norm, and at evaluations the layer-averaged Lipschitz statistics: Jacobian norm,
mean / max squared input norm and the ratios) and DIR/compare.md (final values, one row per run),
and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import yaml

from attention_simulator.cli import exit_on_user_error
from attention_simulator.diagnostics.report import LAYER_PANELS, LIPSCHITZ_PANELS, layer_columns
from attention_simulator.errors import ConfigError

PER_LAYER = [p for p, _ in LAYER_PANELS]  # averaged over layers into '.../layer_mean/...' columns
LIPSCHITZ = [p for patterns, _ in LIPSCHITZ_PANELS for p in patterns if p]  # the same, logged at evaluations


def load(run_dir: Path) -> tuple[str, pd.DataFrame]:
    metrics = run_dir / "metrics.parquet"
    if not metrics.exists():
        raise ConfigError(f"{metrics} not found: is {run_dir} a run directory of attention_simulator.train?")
    frame = pd.read_parquet(metrics)
    config_path = run_dir / ".hydra" / "config.yaml"
    label = run_dir.name
    if config_path.exists():
        config = yaml.safe_load(config_path.read_text())
        label = f"{config.get('name', run_dir.name)} ({config['attention']['backend']})"
    return label, with_layer_means(frame)


def with_layer_means(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` and, for each per-layer statistic it holds, the mean over layers as
    '.../layer_mean/...' (lipschitz/layer_mean/spectral_max, attn/layer_mean/mass_mean, ...)."""
    means = {}
    for pattern in PER_LAYER + LIPSCHITZ:
        columns = list(layer_columns(frame, pattern).values())
        if columns:
            means[pattern.replace("{layer}", "layer_mean")] = frame[columns].mean(axis=1, skipna=False)
    return frame.assign(**means)


def statistics(frames: list[pd.DataFrame]) -> list[str]:
    """The statistics every run recorded: losses and eval metrics, then the layer means (the
    Lipschitz ones after the gradient norm)."""
    common = set.intersection(*(set(f.columns) for f in frames))
    head = [k for k in ("train/loss", "eval/loss") if k in common]
    head += sorted(k for k in common if k.startswith("eval/") and k != "eval/loss" and k.count("/") == 1)
    layer_means = [p.replace("{layer}", "layer_mean") for p in PER_LAYER]
    lipschitz = [p.replace("{layer}", "layer_mean") for p in LIPSCHITZ]
    tail = ["train/grad_norm", *lipschitz]
    return head + [k for k in layer_means if k in common] + [k for k in tail if k in common]


def final(frame: pd.DataFrame, key: str) -> float:
    values = frame[key].dropna()
    return float(values.iloc[-1]) if len(values) else float("nan")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; numbers to 4 significant digits."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def markdown(labels: list[str], frames: list[pd.DataFrame], keys: list[str]) -> str:
    return markdown_table(
        ["run", *keys], [[label, *(final(frame, k) for k in keys)] for label, frame in zip(labels, frames)]
    )


def plot(labels, frames, keys, path: Path):
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes.flat, keys):
        for label, frame in zip(labels, frames):
            points = frame[["step", key]].dropna()
            at_eval = key.startswith(("eval/", "lipschitz/"))
            ax.plot(points["step"], points[key], label=label, marker="o" if at_eval else None, ms=3)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        if "loss" in key or "grad_norm" in key:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("."), help="where compare.png and compare.md go")
    args = parser.parse_args(argv)
    labels, frames = zip(*(load(run) for run in args.runs))
    lengths = {label: int(frame["step"].max()) for label, frame in zip(labels, frames)}
    if max(lengths.values()) > 1.5 * min(lengths.values()):
        print(f"warning: the runs have different lengths (last step: {lengths}): their final values are not "
              "comparable; the curves are", file=sys.stderr)  # fmt: skip
    keys = statistics(list(frames))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(labels, frames, keys, args.out / "compare.png")
    table = markdown(list(labels), list(frames), keys)
    (args.out / "compare.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'compare.md'}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
