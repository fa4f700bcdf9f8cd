"""Create a W&B workspace with the attention-norm panels for a project (needs network).

    python scripts/wandb_dashboard.py --entity ENTITY --project attention-simulator

One section per group of statistics; each panel plots every layer through a regular expression
over the keys the diagnostics log (attn/block_NN/mass_mean, resid/block_NN/norm_mean, ...).
"""

from __future__ import annotations

import argparse

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from attention_simulator.cli import exit_on_user_error
from attention_simulator.errors import ConfigError


def per_layer(kind: str, stat: str, title: str, log_y: bool = False) -> wr.LinePlot:
    """One line per layer (and per run) for `kind/block_NN/stat`."""
    return wr.LinePlot(title=title, metric_regex=rf"^{kind}/block_\d+/{stat}$", log_y=log_y)


def lines(title: str, *keys: str, log_y: bool = False) -> wr.LinePlot:
    return wr.LinePlot(title=title, y=list(keys), log_y=log_y)


def build_workspace(entity: str, project: str, name: str = "Attention norms") -> ws.Workspace:
    """The workspace layout (no network: saving it is the caller's choice)."""
    sections = [
        ws.Section(name="Training", is_open=True, panels=[
            lines("loss", "train/loss", "eval/loss", log_y=True),
            lines("accuracy", "train/accuracy", "eval/accuracy"),
            lines("learning rate", "train/lr"),
            lines("global gradient norm", "train/grad_norm", "train/grad_norm_clipped", log_y=True),
        ]),
        ws.Section(name="Attention mass", is_open=True, panels=[
            per_layer("attn", "mass_mean", "mass Σ_j p_ij, mean over rows"),
            per_layer("attn", "mass_max", "mass, max over rows"),
            per_layer("attn", "mass_min", "mass, min over rows"),
            per_layer("attn", "entropy_mean", "softmax entropy, mean over rows"),
            per_layer("attn", "logit_max", "largest attention logit q·kᵀ/√d", log_y=True),
        ]),
        ws.Section(name="Attention sinks and massive activations", panels=[
            per_layer("attn", "sink_mass", "share of attention on the first key"),
            per_layer("attn", "sink_heads", "sink heads: first-key share > 0.3"),
            per_layer("resid", "massive", "residual max |x| / median |x|", log_y=True),
            per_layer("resid", "kurtosis", "residual stream kurtosis", log_y=True),
        ]),
        ws.Section(name="Attention outputs", is_open=True, panels=[
            per_layer("attn_v", "norm_mean", "attention·V norm", log_y=True),
            per_layer("attn_out", "norm_mean", "attention output norm (after projection)", log_y=True),
            per_layer("attn_out", "norm_max", "attention output norm, max token", log_y=True),
            per_layer("attn_out", "grad_norm_mean", "gradient norm at the attention output", log_y=True),
        ]),
        ws.Section(name="Residual stream and MLP", panels=[
            per_layer("resid", "norm_mean", "residual stream norm", log_y=True),
            per_layer("resid", "grad_norm_mean", "residual gradient norm", log_y=True),
            per_layer("mlp_out", "norm_mean", "MLP output norm", log_y=True),
            lines("logits norm", "logits/norm_mean"),
        ]),
        ws.Section(name="Parameters and optimizer", panels=[
            wr.LinePlot(title="update / parameter norm", metric_regex=r"^update_ratio/.*", log_y=True),
            wr.LinePlot(title="gradient norms", metric_regex=r"^grad/.*", log_y=True),
            wr.LinePlot(title="second moment norms", metric_regex=r"^opt/exp_avg_sq/.*", log_y=True),
        ]),
    ]  # fmt: skip
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="attention-simulator")
    parser.add_argument("--name", default="Attention norms")
    args = parser.parse_args()
    workspace = build_workspace(args.entity, args.project, args.name)
    try:
        workspace.save()
    except Exception as e:  # W&B's API: no login, no network, no such entity or project
        raise ConfigError(
            f"W&B did not save the workspace ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It needs network and a login (`wandb login`, or WANDB_API_KEY) with access to --entity {args.entity} "
            f"--project {args.project}."
        ) from e
    print(f"saved workspace {args.name!r}: {workspace.url}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
