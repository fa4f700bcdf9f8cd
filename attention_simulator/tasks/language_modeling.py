"""Language modelling: next-token cross-entropy; loss, perplexity and bits per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..generation import generate_text
from .base import Task, documents_of, perplexities


class LanguageModelingTask(Task):
    """Bits per byte = Σ −log₂ p(target) / Σ UTF-8 bytes of the targets: comparable across
    tokenizers (the end-of-document token has no bytes; its loss still counts)."""

    main_metric = "bits_per_byte"
    data_kind = "text"

    def __init__(self, sample_prompts: list[str] = (), sample_tokens: int = 64, sample_temperature: float = 0.0,
                 z_loss: float = 0.0):  # fmt: skip
        if z_loss < 0:
            raise ConfigError(f"task.z_loss={z_loss} must be >= 0 (0 = off; 1e-4 in PaLM and Wortsman et al. 2023).")
        self.sample_prompts, self.sample_tokens = list(sample_prompts), sample_tokens
        self.sample_temperature, self.z_loss = sample_temperature, z_loss

    @staticmethod
    def _logits(model: nn.Module, batch) -> torch.Tensor:
        """(B·L, V) fp32 logits of every position."""
        documents = documents_of(batch)  # packed documents (data.document_masks): passed only when there are some
        extra = {} if documents is None else {"documents": documents}
        if "positions" in batch:  # a share of each sequence (context parallelism)
            extra["positions"] = batch["positions"]
        return model(batch["inputs"], **extra).float().flatten(0, 1)  # (B·L, V)

    def _nll(self, model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["targets"].flatten(), reduction="none")  # (B·L,)

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy, plus with `z_loss` the auxiliary z_loss · mean(log Z)², log Z the
        logsumexp of a position's logits: it keeps the output logits from drifting (PaLM)."""
        logits = self._logits(model, batch)
        nll = F.cross_entropy(logits, batch["targets"].flatten(), reduction="none")  # (B·L,)
        loss = nll.mean()
        bits_per_byte = nll.detach().sum() / (math.log(2) * batch["target_bytes"].sum().clamp(min=1))
        metrics = {"loss": loss.detach(), "bits_per_byte": bits_per_byte}
        if self.z_loss:
            z_term = self.z_loss * logits.logsumexp(-1).square().mean()
            loss, metrics["z_loss"] = loss + z_term, z_term.detach()
        return loss, metrics

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor | int]]:
        nll = self._nll(model, batch).view(batch["targets"].shape)  # (B, L): per sequence, below
        return {
            "loss": (nll.sum(1), torch.full_like(nll[:, 0], nll.shape[1])),
            "bits_per_byte": (nll.sum(1) / math.log(2), batch["target_bytes"].sum(1).to(nll)),
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
