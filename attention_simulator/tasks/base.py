"""What every task provides beyond training_step / eval_step."""

from __future__ import annotations

from torch import nn


class Task:
    main_metric: str  # the eval metric a run reports (and sweeps compare)
    data_kind: str  # the data it trains on: images | text | speech (the data's `kind`)

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from logged ones on the host (e.g. perplexity from loss)."""
        return {}

    def samples(self, model: nn.Module, data) -> dict[str, str]:
        """Text to log at evaluation (e.g. language-model continuations)."""
        return {}
