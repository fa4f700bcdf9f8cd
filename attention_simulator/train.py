"""Entry point: compose the config, build the components, fit.

python -m attention_simulator.train +experiment=vit_sigmoid [key=value ...]
python -m attention_simulator.train --help        # config groups and options
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import optorch

from .checkpoint import latest_valid
from .cli import exit_on_user_error, run_cli
from .config import CONFIG_DIR, build, check_model_fits_data, check_positions, unused_sigmoid_options, validate
from .diagnostics import Diagnostics
from .distributed import World, from_main, join, launched_rank, leave
from .errors import ConfigError
from .logs import to_log_files
from .parallel import Parallel, check_context_parallel
from .rundir import RunLock, save_configs, snapshot, undo_start
from .tracking import Tracker, final_values
from .trainer import Trainer

if TYPE_CHECKING:
    from .attention import AttentionConfig

log = logging.getLogger("attention_simulator.train")  # not __name__: this module runs as __main__


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, model_args: dict, attention: AttentionConfig | None = None) -> torch.nn.Module:
    """The `model/` config with the attention config (built from `attention/` unless given) and
    what the data decides (e.g. the vocabulary size). A partial: instantiate would turn the
    AttentionConfig back into a node."""
    return build(cfg.model, _partial_=True)(attention=attention or build(cfg.attention), **model_args)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module):
    """The optimizer from `optimizer/` (a partial) with the `schedule/` multiplier on its lr;
    weight decay on the weights of linear and convolution layers only."""
    schedule = build(cfg.schedule, argument_errors=(ValueError,))
    peak = cfg.optimizer.learning_rate
    if not (isinstance(peak, (int, float)) and peak > 0):
        raise ConfigError(f"optimizer.learning_rate={peak!r} must be a number > 0 (the schedule's peak).")
    learning_rate = optorch.schedules.scaled(peak, schedule)
    factory = build(cfg.optimizer)
    mask = optorch.default_weight_decay_mask(model)
    try:
        return factory(learning_rate=learning_rate, weight_decay_mask=mask), learning_rate
    except ValueError as e:  # optorch's argument checks (torch.optim's): they name the argument
        raise ConfigError(f"optimizer ({cfg.optimizer._target_}): {e} Change it with optimizer.<argument>=...") from e


def shared_run_dir(own: Path, world: World) -> Path:
    """Rank 0's run directory, for every process. Under torchrun each process composed its own
    (Hydra's ${now:} can tick between them); a process whose own differs removes it if empty."""
    shared = Path(from_main(str(own)))
    if world.is_main:
        shared.mkdir(parents=True, exist_ok=True)
    elif own != shared and own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    return shared


def finished_run(run_dir: Path) -> tuple[DictConfig, Path]:
    """A run directory's config (.hydra/config.yaml) and newest complete checkpoint, for scripts
    that rebuild a trained model; a ConfigError when either is missing."""
    checkpoint = latest_valid(run_dir / "checkpoints")
    config = run_dir / ".hydra" / "config.yaml"
    if checkpoint is None or not config.is_file():
        raise ConfigError(
            f"no complete checkpoint (checkpoints/step_*.pt) and config (.hydra/config.yaml) in {str(run_dir)!r}: "
            "pass the run directory of an attention_simulator.train run."
        )
    return OmegaConf.load(config), checkpoint


def make_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """Build every component of a composed config into a Trainer restored from its checkpoint
    (one per process under torchrun: only rank 0's writes files)."""
    validate(cfg)
    trainer_cfg, attention = build(cfg.trainer), build(cfg.attention)
    check_context_parallel(trainer_cfg.context_parallel, cfg, attention, trainer_cfg.compile)
    world, trainer_cfg.device = join(trainer_cfg.device)
    parallel = Parallel.setup(world, trainer_cfg.device, trainer_cfg.parallel, trainer_cfg.context_parallel)
    run_dir = shared_run_dir(run_dir, world)
    seed_everything(trainer_cfg.seed)
    data, task = build(cfg.data), build(cfg.task)
    if task.data_kind != data.kind:
        masked = "Text data gives masked-modelling batches with data.masking set (e.g. 0.15), next-token ones with "
        raise ConfigError(
            f"task {cfg.task._target_} trains on {task.data_kind} data, but data={data.name} is {data.kind} data. "
            + (masked + "data.masking=null. " if "text" in (task.data_kind, data.kind) else "")
            + "Choose a task and data of one kind (or start from an experiment: +experiment=vit_*|lm_*|mlm_*|asr_*)."
        )
    data.prepare()  # the file work (datasets, tokenisers), after the checks that need none
    check_model_fits_data(cfg, data.model_args)
    if (note := unused_sigmoid_options(cfg)) and world.is_main:
        log.info(note)
    model = build_model(cfg, data.model_args, attention)
    check_positions(model, data)
    optimizer, learning_rate = build_optimizer(cfg, model)
    diagnostics = Diagnostics(build(cfg.diagnostics), model)
    trainer = Trainer(
        trainer_cfg, task=task, model=model, optimizer=optimizer, data=data, tracker=Tracker({}), run_dir=run_dir,
        learning_rate=learning_rate, diagnostics=diagnostics, parallel=parallel,
    )  # fmt: skip
    trainer.restore()  # the last start-up check: W&B and the parquet file only start after it
    if world.is_main:
        trainer.attach_tracker(build(cfg.logger)(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True)))
    return trainer


def start(cfg: DictConfig, run_dir: Path, lock: RunLock | None) -> Trainer:
    """make_trainer holding the run directory's lock (rank 0). A start-up error (ConfigError)
    leaves the directory as it was: what this start added is removed again."""
    if lock is None:
        return make_trainer(cfg, run_dir)
    before = snapshot(run_dir)
    taken_over = lock.acquire()  # raises if another process is training here: then nothing is touched
    if taken_over:
        log.warning(taken_over)
    try:
        trainer = make_trainer(cfg, run_dir)
    except ConfigError:
        lock.release()
        undo_start(run_dir, before)
        raise
    save_configs(trainer.run_dir, cfg)
    return trainer


def continue_command(run_dir: Path) -> str:
    """The command that continues a run stopped at trainer.run_steps."""
    typed = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ["..."]
    kept = [o for o in typed if not o.startswith(("hydra.run.dir=", "trainer.resume="))]
    return " ".join(["python -m attention_simulator.train", *kept, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])


def fit_and_report(cfg: DictConfig, run_dir: Path, lock: RunLock | None) -> float:
    """Train, then (rank 0) write the report; the final evaluation of the task's main metric (NaN
    on processes other than rank 0). The trainer, and the process groups its model holds, go
    when this returns: before the process group is left."""
    trainer = start(cfg, run_dir, lock).fit()
    if not trainer.world.is_main:
        return float("nan")
    if trainer.step < trainer.cfg.max_steps:
        log.info(
            f"stopped at step {trainer.step} of {trainer.cfg.max_steps}: this job's share "
            f"(trainer.run_steps={trainer.cfg.run_steps}) is done and checkpointed. Continue with\n"
            f"  {continue_command(trainer.run_dir)}"
        )
    if trainer.cfg.report:
        from .diagnostics.report import write_report  # matplotlib: imported when there is a report to draw

        write_report(trainer.run_dir, main_metric=trainer.task.main_metric, name=cfg.name)
    log.info(f"run dir: {trainer.run_dir}")
    return final_values(trainer.run_dir / "metrics.parquet").get(f"eval/{trainer.task.main_metric}", float("nan"))


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train a composed config; return the final evaluation of the task's main metric (NaN on
    processes other than rank 0)."""
    lock = RunLock(run_dir) if launched_rank() == 0 else None
    clean = False
    try:
        final = fit_and_report(cfg, run_dir, lock)
        clean = True
        return final
    finally:
        if lock is not None:
            lock.release()
        leave(clean)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        try:
            return run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except Exception as e:  # a bug or a crash: its traceback belongs in train.log too
            if not isinstance(e, ConfigError):
                to_log_files("training failed", exc_info=e)
            raise


if __name__ == "__main__":
    run_cli(main)
