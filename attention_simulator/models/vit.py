"""Vision Transformer (Dosovitskiy et al. 2021) for image classification."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..attention import sincos_2d
from ..errors import ConfigError
from ..probes import Probe
from .trunk import Trunk, add_pos_embed, init_weights, trunk_options


def patch_grid(img_size: int, patch_size: int) -> int:
    """Patches per side of an image cut into non-overlapping patch_size × patch_size patches."""
    if img_size % patch_size:
        raise ConfigError(f"model.img_size={img_size} is not divisible by model.patch_size={patch_size}.")
    return img_size // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p·p·C): the patches in raster order, each flattened row by row."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


@trunk_options
class VisionTransformer(nn.Module):
    """images (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, num_classes: int, pool: str = "cls",
                 pos_embed: str = "learned", **trunk):  # fmt: skip
        super().__init__()
        if pool not in ("cls", "avg"):
            raise ConfigError(f"model.pool={pool!r}: use 'cls' (class token) or 'avg' (global average pooling).")
        self.patch_size, self.pool, dim = patch_size, pool, trunk["dim"]
        grid = patch_grid(img_size, patch_size)
        self.patch_embed = nn.Linear(in_chans * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        add_pos_embed(self, pos_embed, grid * grid, dim, lambda: sincos_2d(grid, dim))  # none: RoPE / ALiBi, or none
        self.blocks = Trunk(**trunk)
        self.norm = self.blocks.final_norm()
        self.head = nn.Linear(dim, num_classes)
        self.logits_probe = Probe("logits")
        self.reset_parameters()

    def reset_parameters(self):
        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = patchify(images, self.patch_size)  # (B, N, p*p*C)
        x = self.patch_embed(x)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        x = self.norm(self.blocks(x))  # (B, T, D)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
        return self.logits_probe(self.head(x))  # (B, num_classes)
