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


def edit_counts(references: list[str], hypotheses: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"wer": (word edits, reference words), "cer": (character edits, reference characters)},
    one of each per utterance (B,): summed over utterances, batches and ranks they give the
    corpus-level rates."""

    def per_utterance(output):
        edits, lengths = [], []
        for chunks in output.alignments:
            edits.append(sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                             for c in chunks if c.type != "equal"))  # fmt: skip
            lengths.append(sum(c.ref_end_idx - c.ref_start_idx for c in chunks))
        return torch.tensor(edits, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)

    return {"wer": per_utterance(jiwer.process_words(references, hypotheses)),
            "cer": per_utterance(jiwer.process_characters(references, hypotheses))}  # fmt: skip


def impossible_alignments(frames: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """(B,) True where CTC has no path: it needs a frame per label, plus one for the blank that
    must separate each pair of equal neighbours. CTC's loss there is infinite."""
    valid_pairs = torch.arange(targets.shape[1] - 1, device=targets.device) < (target_lengths[:, None] - 1)
    repeats = ((targets[:, 1:] == targets[:, :-1]) & valid_pairs).sum(1)  # (B,)
    return frames < target_lengths + repeats


class SpeechRecognitionTask(Task):
    """CTC over characters; eval: loss per utterance, and corpus-level CER / WER of greedy decoding.

    An utterance whose transcript cannot fit its frames (an impossible alignment: infinite loss)
    is left out of the loss and counted instead: `ctc_inf` is the fraction of such utterances."""

    main_metric = "wer"
    data_kind = "speech"

    def __init__(self, num_samples: int = 2):
        self.num_samples = num_samples

    @staticmethod
    def _ctc(model: nn.Module, batch):
        """Per-utterance losses divided by transcript length (as reduction="mean"), 0 where the
        alignment is impossible (also their gradient); which those are; log-probs; frames."""
        log_probs, lengths = model(batch["features"], batch["feature_lengths"])  # (B, T', V), (B,)
        losses = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                            blank=BLANK, reduction="none", zero_infinity=True)  # (B,)  # fmt: skip
        impossible = impossible_alignments(lengths, batch["targets"], batch["target_lengths"])
        return losses / batch["target_lengths"].clamp(min=1), impossible, log_probs, lengths

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, impossible, _, _ = self._ctc(model, batch)
        loss = losses.sum() / (~impossible).sum().clamp(min=1)  # the mean over possible alignments
        return loss, {"loss": loss.detach(), "ctc_inf": impossible.float().mean()}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple]:
        losses, impossible, log_probs, lengths = self._ctc(model, batch)
        hypotheses = greedy_decode(log_probs, lengths)
        possible = (~impossible).double()
        return {"loss": (losses.double(), possible), "ctc_inf": (impossible.double(), torch.ones_like(possible))} | (
            {k: (edits.to(possible), lengths.to(possible))
             for k, (edits, lengths) in edit_counts(batch["transcripts"], hypotheses).items()}
        )  # fmt: skip

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
