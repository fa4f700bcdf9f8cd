"""Hydra multirun sweeps (basic and submitit-local launchers) and the sweep results table."""

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from attention_simulator.config import CONFIG_DIR, build, validate
from attention_simulator.train import build_model

from ..helpers import run_train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import collect_sweep  # noqa: E402

from attention_simulator.errors import ConfigError  # noqa: E402

SWEEP = ["-m", "+experiment=vit_sigmoid", "attention.sigmoid_bias=-2,-6", "trainer.max_steps=4", "data.batch_size=32"]


def final_accuracy(run_dir: Path) -> float:
    return pd.read_parquet(run_dir / "metrics.parquet")["eval/accuracy"].dropna().iloc[-1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic"])  # submitit_local: the documented sweep (tests/e2e/test_readme.py)
def test_multirun_then_collect_sweep(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    extra = ["logger.wandb=true"] if launcher == "basic" else ["hydra/launcher=submitit_local"]
    result = run_train(*SWEEP, *extra, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # each run is named by its overrides, sorted by key (the launcher left out)
    wandb = ",logger.wandb=True" if launcher == "basic" else ""
    name = "+experiment=vit_sigmoid,attention.sigmoid_bias={},data.batch_size=32" + wandb + ",trainer.max_steps=4"
    runs = {b: sweep_dir / name.format(b) for b in (-2, -6)}
    assert all((d / "metrics.parquet").exists() for d in runs.values()), sorted(p.name for p in sweep_dir.iterdir())

    table = collect_sweep.main([str(sweep_dir)])
    assert list(table["attention.sigmoid_bias"]) == ["-6", "-2"]  # sorted by value; the only swept key
    for bias, run_dir in runs.items():
        row = table[table["attention.sigmoid_bias"] == str(bias)].iloc[0]
        assert row["eval/accuracy"] == final_accuracy(run_dir) and row["step"] == 4
    markdown = (sweep_dir / "sweep.md").read_text().splitlines()
    assert markdown[0].startswith("| attention.sigmoid_bias | step | eval/loss | eval/accuracy")
    assert len(pd.read_csv(sweep_dir / "sweep.csv")) == 2
    with Image.open(sweep_dir / "sweep.png") as png:
        assert png.size[0] > 300
    if launcher == "basic":  # one W&B group for the sweep: name/<sweep dir>
        log = next(runs[-2].glob("wandb/offline-run-*/run-*.wandb"))
        dump = subprocess.run(["wandb", "leet", "inspect", "--json", str(log)], capture_output=True, text=True)
        records = [r["run"] for r in map(json.loads, dump.stdout.splitlines()) if r.get("type") == "run"]
        groups = {run["run_group"] for run in records if "run_group" in run}
        assert groups == {"vit_sigmoid/sweep"}


@pytest.mark.parametrize("preset, swept", [
    ("softmax_vs_sigmoid", {"attention": "softmax,sigmoid", "trainer.seed": "0,1,2"}),
    ("sigmoid_bias", {"sigmoid.bias": "-2,-4,-6,-8,auto", "trainer.seed": "0,1"}),
    ("layerscale", {"model.layer_scale": "null,1e-1,1e-2,1e-4", "trainer.seed": "0,1"}),
    ("stability", {"optimizer.learning_rate": "1e-3,3e-3,1e-2,3e-2,1e-1,3e-1", "attention": "softmax,sigmoid",
                   "attention.qk_norm": "null,layernorm", "trainer.seed": "0,1"}),
])  # fmt: skip
def test_sweep_presets_are_multiruns(preset, swept):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=vit_sigmoid", f"+sweep={preset}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and dict(cfg.hydra.sweeper.params) == swept


def test_collect_sweep_says_when_there_is_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no run directories"):
        collect_sweep.main([str(tmp_path)])


# (probe experiments load a pretraining's checkpoint when built: tests/attention_simulator/test_mae.py runs them)
EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml") if not p.stem.endswith("_probe"))
PRESETS = sorted(p.stem for p in Path(CONFIG_DIR, "sweep").glob("*.yaml"))
MODEL_ARGS = {"vit": {}, "mae": {}, "lm": {"vocab_size": 257}, "mlm": {"vocab_size": 258},
              "asr": {"n_mels": 80, "vocab_size": 29}}  # fmt: skip


def numbers_at_the_ends(values: list[str]) -> list[str]:
    """Swept values with the numbers among them (e.g. learning rates, biases) only by their
    smallest and largest: numbers in between build the same components. Other values (auto,
    null, a config group's options) are all kept."""
    numbers, others = [], []
    for value in values:
        try:
            numbers.append((float(value), value))
        except ValueError:
            others.append(value)
    numbers.sort()
    return others + list(dict.fromkeys(value for _, value in numbers[:1] + numbers[-1:]))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_on_every_experiment_starts(preset, experiment):
    """Each job's config (seeds aside) composes, validates and builds its attention, model and
    trainer: a sweep that switches the backend keeps the experiment's sigmoid options for the
    sigmoid jobs and drops them for the softmax ones, instead of failing after queueing."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", f"+sweep={preset}"], return_hydra_config=True)
        swept = {k: numbers_at_the_ends(str(v).split(",")) for k, v in cfg.hydra.sweeper.params.items()
                 if k != "trainer.seed"}  # fmt: skip
        for values in itertools.product(*swept.values()):
            job = [f"{k}={v}" for k, v in zip(swept, values)]
            job_cfg = compose("train", overrides=[f"+experiment={experiment}", *job])
            validate(job_cfg)
            build(job_cfg.trainer)
            with torch.device("meta"):
                build_model(job_cfg, MODEL_ARGS[experiment.split("_")[0]])


def test_a_sweep_over_experiments_names_each_run_by_its_experiment():
    """`-m +experiment=vit_softmax,vit_sigmoid model.norm=pre,post`: four run folders, not two
    that each experiment's runs would share; a preset's name and the progress bar stay out."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        jobs = [[f"+experiment={e}", f"model.norm={n}", "+sweep=layerscale", "trainer.progress=false"]
                for e in ("vit_softmax", "vit_sigmoid") for n in ("pre", "post")]  # fmt: skip
        names = {compose("train", overrides=job, return_hydra_config=True).hydra.job.override_dirname for job in jobs}
    assert "+experiment=vit_sigmoid,model.norm=post" in names and len(names) == 4


def test_collect_sweep_of_a_single_run_writes_its_table(tmp_path, trained):
    """A sweep of one run (or of runs that differ in nothing): one row per run, by folder."""
    run = tmp_path / "only"
    shutil.copytree(trained("+experiment=vit_sigmoid", "trainer.max_steps=2", "data.batch_size=32").dir, run)
    (run / ".hydra" / "overrides.yaml").write_text("- +experiment=vit_sigmoid\n")
    table = collect_sweep.main([str(tmp_path)])
    assert list(table["run"]) == ["only"] and (tmp_path / "sweep.md").exists() and (tmp_path / "sweep.png").exists()


def test_local_sweeps_start_a_few_runs_at_a_time():
    """submitit_local: hydra.sweeper.max_batch_size defaults to one run per GPU, or per 4 CPU
    cores (at least one); the basic launcher (one at a time anyway) and SLURM are not limited."""
    from attention_simulator.config import jobs_at_once

    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    expected = torch.cuda.device_count() or max(1, (os.cpu_count() or 1) // 4)
    assert jobs_at_once(local) == expected
    assert jobs_at_once("hydra._internal.core_plugins.basic_launcher.BasicLauncher") is None
    assert jobs_at_once("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher") is None
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
    assert cfg.hydra.sweeper.max_batch_size == expected


def fake_run(root: Path, overrides: dict, losses: list[float], grad_norms: list[float]):
    """A run directory as a sweep leaves it: .hydra/overrides.yaml + metrics.parquet."""
    run = root / ",".join(f"{k}={v}" for k, v in overrides.items())
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    steps = list(range(1, len(losses) + 1))
    evals = [float("nan")] * (len(steps) - 1) + [losses[-1]]
    frame = pd.DataFrame({"step": steps, "train/loss": losses, "train/grad_norm": grad_norms, "eval/loss": evals})
    frame.to_parquet(run / "metrics.parquet")


def test_collect_sweep_draws_learning_rate_sensitivity_and_curves(tmp_path):
    """Diverged runs (a non-finite final loss) stay in the table and are left out of the means;
    --curves draws the runs at the largest learning rate; a key no run logged is an error."""
    for lr in ("1e-3", "1e-2", "1e-1"):
        for attention in ("softmax", "sigmoid"):
            for seed in (0, 1):
                diverged = lr == "1e-1" and attention == "softmax" and seed == 1
                final = float("nan") if diverged else {"1e-3": 3.0, "1e-2": 2.0, "1e-1": 2.5}[lr]
                overrides = {"optimizer.learning_rate": lr, "attention": attention, "trainer.seed": seed}
                fake_run(tmp_path, overrides, [5.0, 4.0, final], [1.0, 10.0, 1e4 if diverged else 2.0])
    table = collect_sweep.main([str(tmp_path), "--metric", "eval/loss", "--curves", "train/grad_norm"])
    assert len(table) == 12 and table["eval/loss"].isna().sum() == 1
    for name in ("sweep.png", "sweep_curves.png"):
        with Image.open(tmp_path / name) as png:
            assert png.size[0] > 300
    with pytest.raises(ConfigError, match="train/nothing"):
        collect_sweep.main([str(tmp_path), "--metric", "eval/loss", "--curves", "train/nothing"])


def test_collect_sweep_summarises_each_cell_over_seeds(tmp_path):
    """Mean, standard deviation and a bootstrap interval of the mean over seeds, per cell, against
    the statistics module and scipy's bootstrap; a diverged run is left out of its cell."""
    finals = {"softmax": [2.0, 2.6, 2.3, float("nan")], "sigmoid": [2.1, 2.2, 2.9, 2.5]}
    for attention, values in finals.items():
        for seed, final in enumerate(values):
            fake_run(tmp_path, {"attention": attention, "trainer.seed": seed}, [5.0, final], [1.0, 1.0])
    collect_sweep.main([str(tmp_path), "--metric", "eval/loss"])
    cells = pd.read_csv(tmp_path / "sweep_summary.csv").set_index("attention")
    for attention, values in finals.items():
        finite = [v for v in values if v == v]
        row = cells.loc[attention]
        assert row["eval/loss n"] == len(finite)
        assert row["eval/loss mean"] == pytest.approx(statistics.mean(finite))
        assert row["eval/loss std"] == pytest.approx(statistics.stdev(finite))
        theirs = scipy.stats.bootstrap((finite,), np.mean, method="percentile", n_resamples=10_000,
                                       random_state=1).confidence_interval  # fmt: skip
        spread = max(finite) - min(finite)
        assert abs(row["eval/loss low"] - theirs.low) < 0.05 * spread
        assert abs(row["eval/loss high"] - theirs.high) < 0.05 * spread
    assert "± " in (tmp_path / "sweep_summary.md").read_text()
