"""The training loop: steps, evaluation, mixed precision, accumulation, checkpoint and resume."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

import optorch

from . import checkpoint as ckpt
from .data.loader import seed_for
from .diagnostics import Diagnostics, DiagnosticsConfig
from .distributed import gather_objects, reduce_metrics, sum_across
from .errors import CheckpointError, ConfigError
from .parallel import Parallel, even_batches

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Options of the loop (the `trainer/` config group)."""

    max_steps: int = 1000
    run_steps: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    eval_every: int = 250  # 0: evaluate only at the end
    log_every: int = 10  # metrics are moved to the host (one transfer) every this many steps
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    grad_accum: int = 1
    grad_clip: float | None = 1.0  # global-norm clipping; null: off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds dynamic loss scaling)
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    resume: str | None = None  # null | auto | PATH (a checkpoint file or a run directory)
    progress: bool = True
    report: bool = True  # rank 0 draws report/*.png from metrics.parquet at the end of the run
    compile: bool = False  # torch.compile the model for training steps
    parallel: str = "ddp"  # ddp | fsdp: how the model is replicated over torchrun's processes
    reshard_after_forward: bool = True  # fsdp: free each block's gathered parameters after its forward
    context_parallel: int = 1  # processes that split each sequence (ring attention); must divide the world

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r}: use one of {list(PRECISIONS)}.")
        for name in ("max_steps", "grad_accum", "log_every", "run_steps", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1.")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0 (0 = only at the end).")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"trainer.parallel={self.parallel!r}: use ddp or fsdp.")
        if self.context_parallel < 1:
            raise ConfigError(f"trainer.context_parallel={self.context_parallel} must be >= 1 (1 = off).")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"trainer.grad_clip={self.grad_clip} must be > 0, or null to turn clipping off.")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={self.device} but this machine has no CUDA device; use auto or cpu.")


def _sum(value):
    """A metric's total or count: a number, or a tensor of one per example."""
    return value.sum() if torch.is_tensor(value) else value


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    def __init__(
        self, config: TrainerConfig, *, task, model, optimizer, data, tracker, run_dir, learning_rate=None,
        diagnostics: Diagnostics | None = None, parallel: Parallel | None = None,
    ):  # fmt: skip
        self.cfg, self.task, self.data, self.tracker = config, task, data, tracker
        self.parallel = parallel = parallel or Parallel()
        self.world = parallel.world
        self.diagnostics = diagnostics or Diagnostics(DiagnosticsConfig(every_n_steps=0), model)
        self.run_dir = Path(run_dir)
        self.device = torch.device(config.device)
        self.model = model
        # what training steps call: DDP all-reduces gradients in backward, FSDP reduce-scatters
        # them (and shards the model in place); compiled if asked
        param_dtype = PRECISIONS[config.precision] if parallel.sharded else None
        self.train_model = parallel.wrap(self.model, self.device, param_dtype, config.reshard_after_forward)
        self.ddp = self.train_model if isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel) else None
        if parallel.dp_rank:
            # the weights are identical everywhere (same seed; DDP broadcasts rank 0's): from here
            # on each data-parallel slice draws its own dropout and drop-path masks (the processes
            # of one slice share them: a drop-path decision is per sequence, and they split one)
            torch.manual_seed(seed_for(config.seed, parallel.dp_rank))
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        clip = [optorch.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
        self.optimizer = optorch.chain(*clip, optimizer)
        self.opt_state = self.optimizer.init(self.params)
        self.learning_rate = learning_rate  # step -> lr, for logging
        self.scaler = optorch.amp.dynamic_loss_scale() if config.precision == "fp16" else None
        self.loss_scale = self.scaler.init(self.device) if self.scaler else None
        self.step, self.skipped_steps = 0, 0
        self.grad_norm: torch.Tensor | None = None  # the last step's global gradient norm, when not clipping
        self.batches_consumed = 0  # the data position: micro-batches drawn so far
        self.pending: list[dict[str, torch.Tensor]] = []  # per-step metrics on device, until the next log

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self):
        loader = self.data.train_loader(self.cfg.seed, self.batches_consumed, self.parallel.dp_rank,
                                        self.parallel.dp_size)  # fmt: skip
        batches = iter(loader)
        show = self.cfg.progress and self.world.is_main
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not show, dynamic_ncols=True)
        self.model.train()
        end = (
            self.cfg.max_steps
            if self.cfg.run_steps is None
            else min(self.cfg.max_steps, self.step + self.cfg.run_steps)
        )
        tic = time.perf_counter()
        while self.step < end:
            recording = self.diagnostics.due(self.step + 1)
            with self.diagnostics.recording(recording):
                self.pending.append(self.train_step(batches))
            self.step += 1
            bar.update()
            if recording or self._every(self.cfg.log_every) or self.step == end:
                now = time.perf_counter()
                self.log_training(bar, steps_per_sec=len(self.pending) / (now - tic))
                tic = now  # logging's own cost counts toward the next interval
            if self._every(self.cfg.eval_every) or self.step == self.cfg.max_steps:
                self.evaluate()
            if self._every(self.cfg.checkpoint_every) or self.step == end:
                self.save_checkpoint()
        bar.close()
        self.tracker.close()
        return self

    def _every(self, period: int) -> bool:
        return period > 0 and self.step % period == 0

    def autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def no_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients in the last micro-batch's backward only: every other
        micro-batch runs its forward and backward inside one `no_sync()`."""
        return contextlib.nullcontext() if last_micro_batch or self.ddp is None else self.ddp.no_sync()

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        # activation-gradient probes report gradients of the loss the optimizer minimises: the
        # mean over processes of each one's loss (and unscaled from fp16's loss scale)
        unscale = 1.0 / self.world.world_size
        self.diagnostics.grad_unscale = self.loss_scale.scale.reciprocal() * unscale if self.scaler else unscale
        for micro in range(self.cfg.grad_accum):
            with self.no_sync(micro == self.cfg.grad_accum - 1), self.parallel.context(self.train_model):
                with self.autocast():
                    batch = self.parallel.split(_to(next(batches), self.device))
                    loss, metrics = self.task.training_step(self.train_model, batch)
                self.batches_consumed += 1
                loss = loss / self.cfg.grad_accum
                (self.scaler.scale(loss, self.loss_scale) if self.scaler else loss).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / self.cfg.grad_accum
        self.optimizer_step()
        return totals

    def optimizer_step(self):
        # a parameter without a gradient (unused this step) is left alone, as torch.optim does
        grads = {k: p.grad for k, p in self.params.items() if p.grad is not None}
        found_inf = self.scaler.unscale(grads, self.loss_scale) if self.scaler else None
        self.diagnostics.record_gradients(self.params, grads)  # unscaled, before the optimizer consumes them
        if not self.cfg.grad_clip:  # clipping keeps the global norm; without it, it is measured here
            self.grad_norm = torch.linalg.vector_norm(torch.stack(optorch.norms(list(grads.values()))))
        if self.scaler:
            self.loss_scale = self.scaler.update(self.loss_scale, found_inf)
            if found_inf.item():  # the one sync fp16 needs, as GradScaler's
                self.skipped_steps += 1
                self.model.zero_grad(set_to_none=True)
                return
        updates, self.opt_state = self.optimizer.update(grads, self.opt_state, self.params)
        self.diagnostics.record_update(updates, self.opt_state)
        optorch.apply_updates(self.params, updates)
        self.model.zero_grad(set_to_none=True)

    # ---- metrics ---------------------------------------------------------------------------------

    def log_training(self, bar, steps_per_sec: float):
        device_metrics = {f"train/{k}": torch.stack([m[k] for m in self.pending]).mean() for k in self.pending[0]}
        if self.cfg.grad_clip:
            norm = self.opt_state[0].global_norm  # before clipping, kept by optorch on device
            device_metrics["train/grad_norm"] = norm
            device_metrics["train/grad_norm_clipped"] = norm * torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0)
        elif self.grad_norm is not None:
            device_metrics["train/grad_norm"] = self.grad_norm
        if self.scaler:
            device_metrics["train/loss_scale"] = self.loss_scale.scale
        device_metrics.update(self.diagnostics.pop())
        metrics = self._to_host(device_metrics)
        metrics |= self.task.derived(metrics)
        self.pending.clear()
        metrics["train/steps_per_sec"] = steps_per_sec
        if self.learning_rate is not None:
            metrics["train/lr"] = self.learning_rate(self.step - 1)
        if self.scaler:
            metrics["train/skipped_steps"] = self.skipped_steps
        self.tracker.log(self.step, metrics)
        shown = ("train/loss", f"train/{self.task.main_metric}")
        bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4g}" for k in shown if k in metrics})

    def _to_host(self, device_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """All of a logging step's values (0-d tensors) in one device -> host transfer, reduced
        over processes in one collective (`distributed.reduce_metrics`: maxima by max, minima by
        min, RMS by root mean square, the rest averaged)."""
        if not device_metrics:
            return {}
        values = reduce_metrics(list(device_metrics), torch.stack([v.float() for v in device_metrics.values()]))
        return dict(zip(device_metrics, values.tolist()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every evaluation loader (e.g. one per context length) -> eval/<metric><suffix>."""
        self.model.eval()
        sums: dict[str, list] = {}  # eval/<metric><suffix> -> [total, count] over this process's batches
        examples: dict[str, dict] = {}  # suffix -> eval/<metric> -> per-example (totals, counts)
        final = self.step == self.cfg.max_steps
        loaders = self.data.eval_loaders(self.parallel.dp_rank, self.parallel.dp_size)
        for suffix, loader in loaders.items():
            batch = None
            for i, batch in enumerate(loader):
                # activation statistics of the main evaluation's first batch, recorded while evaluating
                with self.diagnostics.recording(i == 0 and not suffix, eval=True):
                    for k, (total, count) in self.eval_step(batch).items():
                        if final and torch.is_tensor(total) and total.ndim == 1:
                            examples.setdefault(suffix, {}).setdefault(f"eval/{k}", []).append((total, count))
                        acc = sums.setdefault(f"eval/{k}{suffix}", [0.0, 0])
                        acc[0], acc[1] = acc[0] + _sum(total), acc[1] + _sum(count)
                if i == 0 and not suffix:
                    self.diagnostics.evaluation_batch(self.model, self.eval_step, batch, self.parallel)
            if self.parallel.sharded:  # every forward gathers parameters from all processes: as many here
                for _ in range(even_batches(len(loader), self.device) - len(loader)):
                    self.eval_step(batch)  # uncounted
        # totals and counts summed over processes before dividing: exact means over the whole split
        pairs = [torch.as_tensor(v, device=self.device, dtype=torch.float64) for pair in sums.values() for v in pair]
        pairs = sum_across(torch.stack(pairs)).view(-1, 2)
        results = dict(zip(sums, (pairs[:, 0] / pairs[:, 1]).tolist())) | self._to_host(self.diagnostics.pop())
        if examples:
            self.save_examples(examples)
        results |= self.task.derived(results)
        samples = self.samples()
        self.tracker.log(self.step, results | samples)
        self.model.train()
        self.tracker.flush()
        return results

    def save_examples(self, examples: dict[str, dict]):
        """The final evaluation's per-example totals and counts (a task's eval_step returns (B,)
        tensors for those; `collect_sweep.py` bootstraps over them) to RUN_DIR/eval_examples.parquet:
        columns `split` (the metric's suffix: "" for the main split, "@long_4x", "@256", ...),
        `eval/<metric>` and `eval/<metric> count`, one row per example of each split."""
        frames = []
        for suffix, metrics in examples.items():
            columns = {}
            for k, pairs in metrics.items():
                columns[k] = torch.cat([total.double() for total, _ in pairs])
                columns[f"{k} count"] = torch.cat([count.double() for _, count in pairs])
            table = torch.stack(list(columns.values()), 1)  # (examples, columns)
            if self.parallel.cp is not None:  # each process of a cp group holds a share of every sequence
                torch.distributed.all_reduce(table, group=self.parallel.cp.group)
            keep = self.parallel.cp is None or self.parallel.cp.rank == 0
            parts = [p for p in gather_objects(table.cpu() if keep else None) if p is not None]
            frame = pd.DataFrame(torch.cat(parts).numpy(), columns=list(columns))
            frames.append(frame.assign(split=suffix)[["split", *columns]])
        if self.world.is_main:
            pd.concat(frames, ignore_index=True).to_parquet(self.run_dir / "eval_examples.parquet")

    def eval_step(self, batch) -> dict:
        with self.autocast(), self.parallel.context(self.model):
            return self.task.eval_step(self.model, self.parallel.split(_to(batch, self.device)))

    def samples(self) -> dict[str, str]:
        """The task's samples (e.g. text continuations), logged by rank 0. Sharded, every
        process decodes with it (each forward is collective), from the same random stream so that
        all stop at the same token."""
        if not self.parallel.sharded:
            return self.task.samples(self.model, self.data) if self.world.is_main else {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed_for(self.cfg.seed, self.step))
            samples = self.task.samples(self.model, self.data)
        return samples if self.world.is_main else {}

    # ---- checkpoint / resume ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": optorch.state_dict(self.opt_state),
            "loss_scale": optorch.state_dict(self.loss_scale) if self.scaler else None,
            "skipped_steps": self.skipped_steps,
            "data_position": self.batches_consumed,
            "data": self.data.state_dict(),
            "world_size": self.world.world_size,
            "rng": gather_objects(rng_state()),  # every process's: each draws its own masks
        }

    def attach_tracker(self, tracker):
        """Where metrics go, once restored (a resumed run keeps its earlier rows up to its step)."""
        self.tracker = tracker
        if tracker.parquet and self.step:
            tracker.parquet.resume(self.step)

    def save_checkpoint(self):
        state = self.state_dict()  # on every process: it gathers their random states
        directory = self.run_dir / "checkpoints"
        if self.parallel.sharded:  # every process writes its own shards
            ckpt.save_sharded(ckpt.checkpoint_path(directory, self.step, sharded=True), state)
        elif self.world.is_main:
            ckpt.save_checkpoint(ckpt.checkpoint_path(directory, self.step), state)
        if self.world.is_main:
            ckpt.prune(directory, self.cfg.keep_checkpoints)
            self.tracker.flush()

    def restore(self):
        """Resume from trainer.resume, or refuse to start over a run that has checkpoints."""
        directory = self.run_dir / "checkpoints"
        path = ckpt.resolve_resume(self.cfg.resume, self.run_dir) if self.cfg.resume else None
        if path is None:
            if not self.cfg.resume and ckpt.list_checkpoints(directory):
                raise ConfigError(
                    f"{str(directory)!r} already holds checkpoints of an earlier run; nothing was overwritten. "
                    "Continue it with trainer.resume=auto, or start fresh in another hydra.run.dir."
                )
            if self.cfg.resume:
                log.info(f"trainer.resume=auto: no checkpoint in {str(directory)!r} yet; starting at step 0")
            return
        if self.parallel.sharded:  # each process reads its shards, from a checkpoint of any process count
            template = {"model": self.model.state_dict(), "optimizer": optorch.state_dict(self.opt_state)}
            state = ckpt.load_into(path, template)
        else:
            state = ckpt.load_checkpoint(path)  # a sharded one is read whole
        self.load_state_dict(state)
        log.info(f"resumed from {path} at step {self.step}")

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        try:
            self.opt_state = optorch.load_state_dict(self.opt_state, state["optimizer"])
        except ValueError as e:
            raise CheckpointError(
                f"the checkpoint's optimizer state does not fit this run's optimizer ({e}). Resume with the "
                "optimizer (and trainer.grad_clip on or off) the run was started with."
            ) from e
        if self.scaler and state["loss_scale"] is not None:
            self.loss_scale = optorch.load_state_dict(self.loss_scale, state["loss_scale"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.batches_consumed = state["data_position"]  # global batches: each process drew one of each
        self.data.load_state_dict(state["data"], self.world.rank, self.world.world_size)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world.world_size and self.world.is_main:
            log.warning(
                f"resuming a {saved_world}-process run in {self.world.world_size}: the data continues at global batch "
                f"{self.batches_consumed}; it is the same data only if data.batch_size × data-parallel processes is "
                "unchanged."
            )
        saved = state["rng"]
        if self.world.rank < len(saved):
            set_rng_state(saved[self.world.rank])
        else:  # more processes than the run had: a new, distinct stream
            torch.manual_seed(seed_for(self.cfg.seed, self.world.rank, self.step))


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
