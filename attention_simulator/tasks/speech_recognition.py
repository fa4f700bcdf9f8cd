"""Speech recognition: CTC loss, greedy decoding, character and word error rates (jiwer)."""

from __future__ import annotations

import jiwer
import torch
import torch.nn.functional as F
from torch import nn

from ..data.speech import BLANK, decode_ids
from .base import Task


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best path: the most likely symbol per frame, repeats merged, blanks removed."""
    best = log_probs.argmax(-1).cpu()  # (B, T)
    texts = []
    for path, length in zip(best, lengths.tolist()):
        path = path[:length]
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]
        texts.append(" ".join(decode_ids(path[keep].tolist()).split()))
    return texts


def edit_counts(references: list[str], hypotheses: list[str]) -> dict[str, tuple[int, int]]:
    """{"wer": (word edits, reference words), "cer": (character edits, reference characters)}:
    summed over batches (and ranks) they give the corpus-level rates."""
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)

    def errors(o):
        return o.substitutions + o.deletions + o.insertions, o.substitutions + o.deletions + o.hits

    return {"wer": errors(words), "cer": errors(chars)}


class SpeechRecognitionTask(Task):
    """CTC over characters; eval: loss per utterance, and corpus-level CER / WER of greedy decoding."""

    main_metric = "wer"

    def __init__(self, num_samples: int = 2):
        self.num_samples = num_samples

    @staticmethod
    def _ctc(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs, lengths = model(batch["features"], batch["feature_lengths"])  # (B, T', V), (B,)
        losses = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                            blank=BLANK, reduction="none", zero_infinity=True)  # (B,)  # fmt: skip
        return losses, log_probs, lengths

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, _, _ = self._ctc(model, batch)
        # per utterance, divided by its target length (as reduction="mean"), then averaged
        loss = (losses / batch["target_lengths"].clamp(min=1)).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple]:
        losses, log_probs, lengths = self._ctc(model, batch)
        hypotheses = greedy_decode(log_probs, lengths)
        loss = (losses / batch["target_lengths"].clamp(min=1)).sum()
        return {"loss": (loss, len(hypotheses))} | edit_counts(batch["transcripts"], hypotheses)

    @torch.no_grad()
    def samples(self, model: nn.Module, data) -> dict[str, str]:
        """Reference and greedy transcript of the first (shortest) dev utterances."""
        if not self.num_samples:
            return {}
        batch = next(iter(data.eval_loaders()[""]))
        device = next(model.parameters()).device
        log_probs, lengths = model(batch["features"].to(device), batch["feature_lengths"].to(device))
        pairs = zip(batch["transcripts"], greedy_decode(log_probs, lengths))
        return {f"samples/{i}": f"ref: {r} | hyp: {h}" for i, (r, h) in zip(range(self.num_samples), pairs)}
