"""Masked autoencoding (He et al. 2022): predict the pixels of the patches the encoder did not see."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.mae import Reconstruction
from .base import Task


def normalized_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (B, N, P) minus its own mean, over its own standard deviation: MAE's
    norm_pix_loss target (unbiased variance, eps inside the root, as in MAE's code). It scores
    a patch's local structure, not its brightness."""
    mean = patches.mean(dim=-1, keepdim=True)  # (B, N, 1)
    var = patches.var(dim=-1, keepdim=True)  # (B, N, 1)
    return (patches - mean) / (var + eps).sqrt()


def patch_errors(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) squared error of each patch's prediction (a mean over its pixels), and (B, N) True
    at the patches the encoder did not see: the only ones the loss counts."""
    out = model(batch["images"])
    if not isinstance(out, Reconstruction):
        raise ConfigError(
            "task=masked_autoencoding trains a masked autoencoder: use model=mae_tiny (or start from "
            "+experiment=mae_softmax, mae_sigmoid or mae_sigmoid_bias)."
        )
    target = normalized_patches(out.patches.float())  # (B, N, P)
    return (out.pred.float() - target).square().mean(dim=-1), out.masked  # (B, N), (B, N)


class MaskedAutoencodingTask(Task):
    """The loss: the per-patch normalised pixels' squared error, averaged over masked patches
    (one patch, one vote). `eval_step` returns its sum and the number of masked patches."""

    main_metric = "loss"
    data_kind = "images"

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        errors, masked = patch_errors(model, batch)
        loss = (errors * masked).sum() / masked.sum()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        errors, masked = patch_errors(model, batch)
        return {"loss": ((errors * masked).sum(1), masked.sum(1).float())}  # per image (B,)
