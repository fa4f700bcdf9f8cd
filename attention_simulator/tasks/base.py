"""What every task provides beyond training_step / eval_step."""

from __future__ import annotations

import math

from torch import nn

from ..attention.masks import Documents


def perplexities(metrics: dict[str, float]) -> dict[str, float]:
    """Perplexity exp(loss) for every loss (train, eval and eval at each length)."""
    return {
        k.replace("loss", "perplexity"): math.exp(min(v, 700.0))
        for k, v in metrics.items()
        if k.rsplit("/", 1)[-1].startswith("loss") and isinstance(v, float)
    }


def documents_of(batch) -> Documents | None:
    """A text batch's document layout (data.document_masks), or None: blocks attend as a whole."""
    return Documents.of(batch["doc_index"], batch["doc_lengths"]) if "doc_index" in batch else None


class Task:
    """What a model is trained for: its loss and metrics on a batch (`configs/task/`).

    A task implements `training_step(model, batch) -> (loss, {name: 0-d tensor})` and
    `eval_step(model, batch) -> {name: (total, count)}` (sums and counts, so the trainer's means
    are exact over batches and processes; (B,) tensors of one total and count per example where
    a metric averages over examples, which the final evaluation keeps for bootstrap intervals),
    and sets `main_metric` and `data_kind`; the methods below are optional. It never moves
    values to the host: the trainer does, once per logging step."""

    main_metric: str  # the eval metric a run reports (and sweeps compare)
    data_kind: str  # the data it trains on: images | text | speech (the data's `kind`)

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from logged ones on the host (e.g. perplexity from loss)."""
        return {}

    def samples(self, model: nn.Module, data) -> dict[str, str]:
        """Text to log at evaluation (e.g. language-model continuations)."""
        return {}
