"""Evaluate a trained run at several context lengths, optionally with attention options changed.

    python scripts/eval_lengths.py RUN_DIR [--lengths 128 256 512] [--set attention.sigmoid_bias=-4.852 ...]

Rebuilds the run from RUN_DIR/.hydra/config.yaml (plus the `--set` overrides, e.g. another
sigmoid bias mode), loads its newest checkpoint and prints the evaluation at every length --
so a bias mode can be compared beyond the training length without retraining.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from attention_simulator.checkpoint import load_checkpoint
from attention_simulator.cli import exit_on_user_error
from attention_simulator.train import finished_run, make_trainer

QUIET = ["logger.wandb=false", "logger.parquet=false", "logger.console=false", "diagnostics.every_n_steps=0",
         "task.sample_prompts=[]"]  # fmt: skip


def evaluate(run_dir: Path, lengths: list[int] | None, overrides: list[str]) -> dict[str, float]:
    cfg, checkpoint = finished_run(run_dir)
    cfg = OmegaConf.merge(
        cfg, OmegaConf.from_dotlist(QUIET + overrides + ([f"data.eval_seq_lens={lengths}"] if lengths else []))
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, Path(tmp))
        trainer.model.load_state_dict(load_checkpoint(checkpoint)["model"])
        return trainer.evaluate()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override, key=value")
    args = parser.parse_args()
    results = evaluate(args.run_dir, args.lengths, args.overrides)

    def by_length(key):  # eval/loss, eval/loss@256, eval/loss@1024: metric, then length as a number
        name, _, length = key.partition("@")
        return name, int(length or 0)

    for key in sorted(results, key=by_length):
        if key.startswith(("eval/loss", "eval/bits_per_byte")):
            print(f"{key:28s} {results[key]:.4f}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
