"""Training throughput of the vit_sigmoid model with diagnostics off / default / full, against a
minimal hand-written loop (same model, data and optimizer) as the floor.

    python scripts/bench_training.py [--steps 200] [--rounds 5] [--experiment vit_sigmoid]

Every contestant trains `--steps` steps from a fresh build, interleaved over `--rounds` rounds,
and the medians are compared in the same run (this machine is noisy). Step time is what the
trainer itself reports (its logged steps/s intervals, which include its logging and diagnostics
but not the one-off evaluation and checkpoint at the end) against the loop's timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

import optorch
from attention_simulator.config import CONFIG_DIR
from attention_simulator.train import make_trainer

QUIET = ["logger.wandb=false", "logger.console=false", "trainer.progress=false", "trainer.eval_every=0"]
VARIANTS = {
    "trainer, diagnostics off": ["diagnostics=off"],
    "trainer, default every 10": ["diagnostics=default", "diagnostics.every_n_steps=10"],
    "trainer, full every step": ["diagnostics=full", "diagnostics.every_n_steps=1"],
}


def build(experiment: str, steps: int, overrides: list[str], run_dir: Path):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        overrides = [f"+experiment={experiment}", f"trainer.max_steps={steps}", *QUIET, *overrides]
        cfg = compose("train", overrides=overrides)
    return make_trainer(cfg, run_dir)


def hand_written_loop(trainer) -> float:
    """The floor: the same steps as the trainer's, with nothing around them; returns seconds."""
    model, params, task, opt = trainer.model, trainer.params, trainer.task, trainer.optimizer
    state = opt.init(params)
    batches = iter(trainer.data.train_loader(seed=0))
    model.train()
    start = time.perf_counter()
    for _ in range(trainer.cfg.max_steps):
        loss, _ = task.training_step(model, next(batches))
        loss.backward()
        grads = {k: p.grad for k, p in params.items()}
        updates, state = opt.update(grads, state, params)
        optorch.apply_updates(params, updates)
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_steps(trainer, run_dir: Path) -> float:
    """Seconds the trainer spent on its steps, from the intervals it logged."""
    trainer.fit()
    rows = pd.read_parquet(run_dir / "metrics.parquet")[["step", "train/steps_per_sec"]].dropna()
    steps = rows["step"].diff().fillna(rows["step"].iloc[0])
    return float((steps / rows["train/steps_per_sec"]).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="vit_sigmoid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    contestants = {"hand-written loop": ["diagnostics=off"], **VARIANTS}
    times = {name: [] for name in contestants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(contestants.items()):
                run_dir = Path(tmp) / f"{r}-{i}"
                trainer = build(args.experiment, args.steps, overrides, run_dir)
                loop = name == "hand-written loop"
                times[name].append(hand_written_loop(trainer) if loop else trainer_steps(trainer, run_dir))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    floor, off = medians["hand-written loop"], medians["trainer, diagnostics off"]
    print(f"{args.experiment}, {args.steps} steps, median of {args.rounds} interleaved rounds:")
    for name, t in medians.items():
        print(f"  {name:28s} {args.steps / t:6.2f} steps/s   {t / floor:5.3f}x the loop   {t / off:5.3f}x off")
    print(f"trainer overhead (off vs loop): {off / floor - 1:+.1%} (goal <= +5%)")
    print(f"default every 10 vs off:        {medians['trainer, default every 10'] / off - 1:+.1%} (goal <= +5%)")
    print(f"full every step vs off:         {medians['trainer, full every step'] / off - 1:+.1%} (goal <= +35%)")


if __name__ == "__main__":
    main()
