"""Entry point: compose the config, build the components, fit.

python -m attention_simulator.train +experiment=vit_sigmoid [key=value ...]
python -m attention_simulator.train --help        # config groups and options
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import optorch

from .config import CONFIG_DIR, build, validate
from .diagnostics import Diagnostics
from .diagnostics.report import write_report
from .distributed import World, from_main, join, leave
from .errors import ConfigError
from .tracking import Tracker
from .trainer import Trainer


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, model_args: dict) -> torch.nn.Module:
    """The `model/` config with the `attention/` config and what the data decides (e.g. the
    vocabulary size). A partial: instantiate would turn the AttentionConfig back into a node."""
    return build(cfg.model, "model", _partial_=True)(attention=build(cfg.attention, "attention"), **model_args)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module):
    """The optimizer from `optimizer/` (a partial) with the `schedule/` multiplier on its lr;
    no weight decay on biases, norms, LayerScale and embeddings."""
    schedule = build(cfg.schedule, "schedule")
    learning_rate = optorch.schedules.scaled(cfg.optimizer.learning_rate, schedule)
    factory = build(cfg.optimizer, "optimizer")
    mask = optorch.default_weight_decay_mask(model.named_parameters())
    return factory(learning_rate=learning_rate, weight_decay_mask=mask), learning_rate


def shared_run_dir(own: Path, world: World) -> Path:
    """Rank 0's run directory, for every process. Under torchrun each process composed its own
    (Hydra's ${now:} can tick between them); a process whose own differs removes it if empty."""
    shared = Path(from_main(str(own)))
    if world.is_main:
        shared.mkdir(parents=True, exist_ok=True)
    elif own != shared and own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    return shared


def make_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """Build every component of a composed config into a ready Trainer (one per process under
    torchrun: only rank 0's writes files)."""
    validate(cfg)
    trainer_cfg = build(cfg.trainer, "trainer")
    world, trainer_cfg.device = join(trainer_cfg.device)
    run_dir = shared_run_dir(run_dir, world)
    seed_everything(trainer_cfg.seed)
    data = build(cfg.data, "data")
    model = build_model(cfg, data.model_args)
    optimizer, learning_rate = build_optimizer(cfg, model)
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = build(cfg.logger, "logger")(run_dir=run_dir, config=config) if world.is_main else Tracker({})
    diagnostics = Diagnostics(build(cfg.diagnostics, "diagnostics"), model)
    return Trainer(
        trainer_cfg, task=build(cfg.task, "task"), model=model, optimizer=optimizer, data=data, tracker=tracker,
        run_dir=run_dir, learning_rate=learning_rate, diagnostics=diagnostics, world=world,
    )  # fmt: skip


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train a composed config; return the final evaluation of the task's main metric (NaN on
    processes other than rank 0)."""
    try:
        trainer = make_trainer(cfg, run_dir).fit()
        if not trainer.world.is_main:
            return float("nan")
        final = write_report(trainer.run_dir, main_metric=trainer.task.main_metric)
        print(f"run dir: {trainer.run_dir}")
        return final.get(f"eval/{trainer.task.main_metric}", float("nan"))
    finally:
        leave()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:  # a user error: one paragraph, no traceback
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
