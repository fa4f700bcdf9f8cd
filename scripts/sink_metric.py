"""A trained language model's attention sink, measured as Gu et al. 2024 measure it.

    python scripts/sink_metric.py RUN_DIR [--sequences 100] [--tokens 64]

Rebuilds the run from RUN_DIR/.hydra/config.yaml, loads its newest checkpoint, takes the first
`--tokens` tokens of the first `--sequences` validation blocks and runs the model once on them
with the attention probes on. For every layer it prints the mean share of each row's attention
on the first token (rows normalised to sum 1, which is how Gu et al. treat sigmoid attention)
and the fraction of heads whose mean share exceeds ε = 0.3; then Sink₁^ε, that fraction over the
heads of every layer -- the number their tables report (e.g. about 18 % of heads for a 60M
softmax model, 0.4 % for sigmoid attention without normalisation).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attention_simulator.checkpoint import load_checkpoint
from attention_simulator.cli import exit_on_user_error
from attention_simulator.errors import ConfigError
from attention_simulator.train import finished_run, make_trainer

QUIET = ["logger.wandb=false", "logger.parquet=false", "logger.console=false", "task.sample_prompts=[]"]
PROBES = [
    "diagnostics.every_n_steps=1",
    "diagnostics.probes=[attn]",
    "diagnostics.gradients=false",
    "diagnostics.parameters=false",
    "diagnostics.optimizer_state=false",
    "diagnostics.lipschitz=false",
]


def first_tokens(loader, sequences: int, tokens: int) -> torch.Tensor:
    """(sequences, tokens): the first tokens of the first validation blocks."""
    rows = []
    for batch in loader:
        rows.append(batch["inputs"][:, :tokens])
        if sum(len(r) for r in rows) >= sequences:
            break
    found = torch.cat(rows)[:sequences]
    if len(found) < sequences or found.shape[1] < tokens:
        raise ConfigError(f"the validation split has {len(found)} blocks of {found.shape[1]} tokens: fewer than "
                          f"--sequences {sequences} of --tokens {tokens}; lower them.")  # fmt: skip
    return found


def sink_metric(run_dir: Path, sequences: int = 100, tokens: int = 64) -> dict[str, float]:
    """{'attn/block_NN/sink_mass': ..., 'attn/block_NN/sink_heads': ..., 'sink': Sink₁^0.3}."""
    cfg, checkpoint = finished_run(run_dir)
    if cfg.task._target_.rsplit(".", 1)[-1] != "LanguageModelingTask":
        raise ConfigError(f"{str(run_dir)!r} is not a language model run: the sink metric reads the first tokens "
                          "of text sequences (task=language_modeling).")  # fmt: skip
    blocks = [f"data.eval_seq_lens=[{cfg.data.seq_len}]", f"data.eval_max_tokens={sequences * cfg.data.seq_len}"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(QUIET + PROBES + blocks))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, Path(tmp))
        trainer.model.load_state_dict(load_checkpoint(checkpoint)["model"])
        trainer.model.eval()
        inputs = first_tokens(trainer.data.eval_loaders()[""], sequences, tokens)
        with torch.no_grad(), trainer.diagnostics.recording():
            trainer.model(inputs.to(trainer.device))
        records = {k: float(v) for k, v in trainer.diagnostics.pop().items() if k.endswith(("sink_mass", "sink_heads"))}
    heads = [v for k, v in records.items() if k.endswith("sink_heads")]  # every layer has the same heads
    return records | {"sink": sum(heads) / len(heads)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    results = sink_metric(args.run_dir, args.sequences, args.tokens)
    print(f"{'layer':10s} {'first-token share':>18s} {'heads > 0.3':>12s}")
    for key in sorted(k for k in results if k.endswith("sink_mass")):
        layer = key.split("/")[1]
        print(f"{layer:10s} {results[key]:18.3f} {results[key.replace('sink_mass', 'sink_heads')]:12.3f}")
    print(
        f"Sink_1^0.3 = {100 * results['sink']:.1f} % of heads ({args.sequences} sequences, first {args.tokens} tokens)"
    )


if __name__ == "__main__":
    with exit_on_user_error():
        main()
