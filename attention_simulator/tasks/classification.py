"""Image classification: batch -> model -> cross-entropy and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task


class ClassificationTask(Task):
    """`training_step` returns (loss, metrics); `eval_step` returns each image's metric and a
    count of one, so the trainer averages exactly over any number of batches (and ranks) and
    keeps the last evaluation's per-image values."""

    main_metric = "accuracy"
    data_kind = "images"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["images"])  # (B, classes)
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, int]]:
        logits = model(batch["images"]).float()
        labels = batch["labels"]
        ones = torch.ones_like(labels, dtype=torch.float32)  # one per image: (B,) sums and counts
        return {
            "loss": (F.cross_entropy(logits, labels, reduction="none"), ones),
            "accuracy": ((logits.argmax(-1) == labels).float(), ones),
        }
