"""End-of-run figures, drawn from the run's metrics.parquet (so they can be redrawn later):

report/curves.png     loss and the task's main metric, train and eval
report/attention.png  per layer over steps: attention mass, attention-output norm, residual
                      norm; and the global gradient norm (panels for what was recorded)
report/lipschitz.png  per layer over evaluations (diagnostics.lipschitz): the attention layer's
                      Jacobian norm ‖J‖₂, its input's mean / max squared token norm, and ‖J‖₂
                      over each of them
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..tracking import final_values  # noqa: E402

LAYER_PANELS = [  # (key pattern with {layer}, title)
    ("attn/{layer}/mass_mean", "attention mass Σ_j p_ij (mean over rows)"),
    ("attn_out/{layer}/norm_mean", "attention output norm (mean over tokens)"),
    ("resid/{layer}/norm_mean", "residual stream norm (mean over tokens)"),
    ("attn/{layer}/sink_mass", "share of attention on the first key (mean over heads and rows)"),
    ("attn/{layer}/sink_heads", "sink heads: mean first-key share > 0.3 (fraction of heads)"),
    ("resid/{layer}/massive", "residual stream: max |x| / median |x|"),
    ("resid/{layer}/kurtosis", "residual stream: kurtosis of the activations"),
]
LIPSCHITZ_PANELS = [  # (solid, dashed) key patterns, title; the solid one's layer-mean goes in comparisons
    (("lipschitz/{layer}/spectral_max", None), "attention Jacobian ‖J‖₂ (max over sequences)"),
    (("lipschitz/{layer}/sq_norm_mean", "lipschitz/{layer}/sq_norm_max"), "input ‖x_i‖²: mean (—), max (--)"),
    (("lipschitz/{layer}/ratio_to_mean_sq_max", "lipschitz/{layer}/ratio_to_max_sq_max"),
     "‖J‖₂ / mean ‖x_i‖² (—), / max ‖x_i‖² (--)"),
]  # fmt: skip


def layer_columns(frame: pd.DataFrame, pattern: str) -> dict[int, str]:
    """{layer index: column} for a pattern like 'attn/{layer}/mass_mean'."""
    regex = re.compile(re.escape(pattern).replace(re.escape("{layer}"), r"block_(\d+)") + "$")
    return {int(m.group(1)): c for c in frame.columns if (m := regex.match(c))}


def _curve(ax, frame: pd.DataFrame, key: str, **style):
    if key in frame:
        rows = frame[["step", key]].dropna()
        ax.plot(rows["step"], rows[key], **style)


def write_report(run_dir: Path, main_metric: str, name: str | None = None) -> dict[str, float]:
    """Write the report figures, titled `name (run folder)`; return the final value of every metric."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.exists():
        return {}
    frame = pd.read_parquet(path)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    title = f"{name} ({Path(run_dir).name})" if name else Path(run_dir).name
    _curves(frame, main_metric, title, out / "curves.png")
    _attention(frame, title, out / "attention.png")
    _lipschitz(frame, title, out / "lipschitz.png")
    return final_values(path)


def _curves(frame, main_metric, title, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", main_metric)):
        _curve(ax, frame, f"train/{metric}", label="train")
        _curve(ax, frame, f"eval/{metric}", label="eval", marker="o", ms=3)
        ax.set(xlabel="step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layers(ax, frame: pd.DataFrame, pattern: str, legend: bool = True, **style):
    """One line per layer of a 'kind/{layer}/stat' pattern, coloured by depth."""
    columns = layer_columns(frame, pattern)
    colors = plt.cm.viridis([i / max(1, len(columns) - 1) for i in range(len(columns))])
    for color, (layer, column) in zip(colors, sorted(columns.items())):
        _curve(ax, frame, column, color=color, label=f"block {layer}" if legend else None, **style)


def _attention(frame, title, path):
    panels = [(p, t) for p, t in LAYER_PANELS if layer_columns(frame, p)]
    has_grad = "train/grad_norm" in frame
    if not panels and not has_grad:
        return
    fig, axes = plt.subplots(1, len(panels) + has_grad, figsize=(4.6 * (len(panels) + has_grad), 3.8),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    for ax, (pattern, panel_title) in zip(axes[0], panels):
        _layers(ax, frame, pattern)
        ax.set(xlabel="step", title=panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_grad:
        ax = axes[0][-1]
        _curve(ax, frame, "train/grad_norm", label="before clipping")
        _curve(ax, frame, "train/grad_norm_clipped", label="after clipping", ls="--")
        ax.set(xlabel="step", title="global gradient norm", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lipschitz(frame, title, path):
    if not layer_columns(frame, LIPSCHITZ_PANELS[0][0][0]):
        return
    fig, axes = plt.subplots(1, len(LIPSCHITZ_PANELS), figsize=(4.6 * len(LIPSCHITZ_PANELS), 3.8),
                             constrained_layout=True)  # fmt: skip
    for ax, ((solid, dashed), panel_title) in zip(axes, LIPSCHITZ_PANELS):
        _layers(ax, frame, solid, marker="o", ms=3)
        if dashed:
            _layers(ax, frame, dashed, legend=False, marker="o", ms=3, ls="--")
        ax.set(xlabel="step", title=panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: attention layers at evaluation")
    fig.savefig(path, dpi=120)
    plt.close(fig)
