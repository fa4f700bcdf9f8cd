"""Vision Transformer (Dosovitskiy et al. 2021) for image classification."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..attention import AttentionConfig, sincos_2d
from ..attention.norms import make_norm
from ..diagnostics.probes import Probe
from ..errors import ConfigError
from .block import TransformerBlock, drop_path_rates, init_weights


def patch_grid(img_size: int, patch_size: int) -> int:
    """Patches per side of an image cut into non-overlapping patch_size × patch_size patches."""
    if img_size % patch_size:
        raise ConfigError(f"model.img_size={img_size} is not divisible by model.patch_size={patch_size}.")
    return img_size // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p·p·C): the patches in raster order, each flattened row by row."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


class VisionTransformer(nn.Module):
    """images (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        pos_embed: str = "learned",
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        norm: str = "pre",
        norm_type: str = "layernorm",
        attention: AttentionConfig = AttentionConfig(),
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if pool not in ("cls", "avg"):
            raise ConfigError(f"model.pool={pool!r}: use 'cls' (class token) or 'avg' (global average pooling).")
        if pos_embed not in ("learned", "sincos", "none"):
            raise ConfigError(f"model.pos_embed={pos_embed!r}: use 'learned', 'sincos' or 'none'.")
        self.patch_size, self.pool = patch_size, pool
        grid = patch_grid(img_size, patch_size)
        self.patch_embed = nn.Linear(in_chans * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        else:  # fixed, or none (zeros: e.g. when attention carries positions, RoPE / ALiBi)
            table = sincos_2d(grid, dim)[None] if pos_embed == "sincos" else torch.zeros(1, grid * grid, dim)
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, attention, mlp_ratio, layer_scale, rate, norm=norm, norm_type=norm_type,
                             checkpointing=activation_checkpointing)
            for rate in drop_path_rates(drop_path, depth)
        )  # fmt: skip
        self.norm = make_norm(norm_type, dim, "model.norm_type")
        self.head = nn.Linear(dim, num_classes)
        self.logits_probe = Probe("logits")
        self.reset_parameters()

    def reset_parameters(self):
        self.apply(init_weights)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = patchify(images, self.patch_size)  # (B, N, p*p*C)
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
        return self.logits_probe(self.head(x))  # (B, num_classes)
