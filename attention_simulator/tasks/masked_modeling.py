"""Masked modelling (BERT): predict the masked tokens of bidirectionally attended text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.masking import IGNORE
from .base import Task, documents_of, perplexities


class MaskedModelingTask(Task):
    """Cross-entropy over the predicted positions only (mean over them); accuracy of the most
    likely token there. The padded end of the last block is padding for the model too."""

    main_metric = "loss"
    data_kind = "masked_text"

    @staticmethod
    def _nll(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-position losses (B·L,) (0 where not predicted), whether each counts, and whether
        its most likely token is the target."""
        logits = model(batch["inputs"], lengths=batch["lengths"], documents=documents_of(batch))  # (B, L, V)
        targets = batch["targets"].flatten()
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE, reduction="none")
        predicted = targets != IGNORE
        return nll, predicted, (logits.detach().flatten(0, 1).argmax(-1) == targets) & predicted

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll, predicted, correct = self._nll(model, batch)
        count = predicted.sum().clamp(min=1)
        loss = nll.sum() / count
        return loss, {"loss": loss.detach(), "accuracy": correct.sum() / count}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        nll, predicted, correct = self._nll(model, batch)
        rows = batch["targets"].shape  # per sequence (B,): its predicted positions' sums and count
        nll, predicted, correct = nll.view(rows), predicted.view(rows).float(), correct.view(rows).float()
        return {"loss": (nll.sum(1), predicted.sum(1)), "accuracy": (correct.sum(1), predicted.sum(1))}

    @staticmethod
    def derived(metrics: dict[str, float]) -> dict[str, float]:
        """Perplexity of the masked tokens, exp(loss), for every loss."""
        return perplexities(metrics)
