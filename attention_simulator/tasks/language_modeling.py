"""Language modelling: next-token cross-entropy; loss, perplexity and bits per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..generation import generate_text
from .base import Task, documents_of, perplexities


class LanguageModelingTask(Task):
    """Bits per byte = Σ −log₂ p(target) / Σ UTF-8 bytes of the targets: comparable across
    tokenizers (the end-of-document token has no bytes; its loss still counts)."""

    main_metric = "bits_per_byte"
    data_kind = "text"

    def __init__(self, sample_prompts: list[str] = (), sample_tokens: int = 64, sample_temperature: float = 0.0):
        self.sample_prompts, self.sample_tokens = list(sample_prompts), sample_tokens
        self.sample_temperature = sample_temperature

    @staticmethod
    def _nll(model: nn.Module, batch) -> torch.Tensor:
        documents = documents_of(batch)  # packed documents (data.document_masks): passed only when there are some
        extra = {} if documents is None else {"documents": documents}
        if "positions" in batch:  # a share of each sequence (context parallelism)
            extra["positions"] = batch["positions"]
        logits = model(batch["inputs"], **extra)  # (B, L, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none")  # (B·L,)

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = self._nll(model, batch)
        loss = nll.mean()
        bits_per_byte = nll.detach().sum() / (math.log(2) * batch["target_bytes"].sum().clamp(min=1))
        return loss, {"loss": loss.detach(), "bits_per_byte": bits_per_byte}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor | int]]:
        nll = self._nll(model, batch)
        return {
            "loss": (nll.sum(), nll.numel()),
            "bits_per_byte": (nll.sum() / math.log(2), batch["target_bytes"].sum()),
        }

    @staticmethod
    def derived(metrics: dict[str, float]) -> dict[str, float]:
        """Perplexity exp(loss) for every loss (train, eval and eval at each length)."""
        return perplexities(metrics)

    def samples(self, model: nn.Module, data) -> dict[str, str]:
        """A continuation of each sample prompt, decoded in one batch (logged at every evaluation)."""
        prompts, tokenizer = list(self.sample_prompts), data.prepare().tokenizer
        texts = generate_text(model, tokenizer, prompts, self.sample_tokens, temperature=self.sample_temperature)
        return {f"samples/{i}": prompt + text for i, (prompt, text) in enumerate(zip(prompts, texts))}
