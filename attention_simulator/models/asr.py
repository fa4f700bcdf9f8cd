"""CTC speech recogniser: log-mel frames -> conv subsampling (×4) -> transformer encoder
(optionally with Conformer convolution modules) -> per-frame character log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import sincos_1d
from ..attention.masks import Padding
from ..errors import ConfigError
from ..probes import Probe
from .trunk import Trunk, add_pos_embed, init_weights, trunk_options


class ConvSubsampling(nn.Module):
    """(B, T, n_mels) -> (B, T', dim) with T' = ((T − 1) // 2 − 1) // 2: two 3×3 convolutions
    of stride 2 over time and frequency (as in the Conformer and ESPnet). Unpadded, so an
    output frame sees only input frames inside its own utterance."""

    def __init__(self, n_mels: int, dim: int, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()
        )
        self.out = nn.Linear(channels * (((n_mels - 1) // 2 - 1) // 2), dim)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x[:, None])  # (B, C, T', M')
        x = self.out(x.permute(0, 2, 1, 3).flatten(2))  # (B, T', dim)
        return x, self.output_lengths(lengths)


class ConformerConvolution(nn.Module):
    """The Conformer's convolution module (Gulati et al. 2020), a residual branch:
    LayerNorm -> pointwise conv + GLU -> depthwise conv -> norm -> SiLU -> pointwise conv.
    LayerNorm replaces BatchNorm so that an utterance's output does not depend on its batch or
    its padding; padded frames are zeroed before the depthwise convolution for the same reason."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"model.conv_kernel={kernel_size} must be odd (a centred depthwise convolution).")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1) * real  # (B, T, D), zero at padding
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        h = self.pointwise_out(F.silu(self.depthwise_norm(h)))
        return x + h * real


@trunk_options
class SpeechRecognizer(nn.Module):
    """features (B, T, n_mels), lengths (B,) -> (log-probs (B, T', vocab), lengths (B,))."""

    def __init__(self, *, n_mels: int, vocab_size: int, subsampling_channels: int = 64, conv_kernel: int | None = None,
                 pos_embed: str = "none", max_frames: int = 4096, dropout: float = 0.1, **trunk):  # fmt: skip
        super().__init__()
        dim = trunk["dim"]
        self.subsampling = ConvSubsampling(n_mels, dim, subsampling_channels)
        # learned: rows past the longest training utterance are never trained
        add_pos_embed(self, pos_embed, max_frames, dim, lambda: sincos_1d(max_frames, dim))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.blocks = Trunk(**trunk)
        convs = (ConformerConvolution(dim, conv_kernel) for _ in self.blocks)
        self.convs = nn.ModuleList(convs) if conv_kernel else None
        self.norm = self.blocks.final_norm()
        self.head = nn.Linear(dim, vocab_size)
        self.logits_probe = Probe("logits")
        self.apply(init_weights)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.subsampling(features, lengths)  # (B, T', D), (B,)
        if self.pos_embed is not None:  # utterances are right-padded: frame t of each is at position t
            if x.shape[1] > self.pos_embed.shape[1]:
                raise ValueError(f"{x.shape[1]} frames exceed model.max_frames={self.pos_embed.shape[1]}.")
            x = x + self.pos_embed[:, : x.shape[1]]  # (B, T', D)
        x = self.dropout(x)
        padding = Padding.of(lengths, x.shape[1])  # once per batch, shared by every layer
        real = padding.real[..., None].to(x.dtype)  # (B, T', 1): 1 at real frames
        for i, block in enumerate(self.blocks):
            x = block(x, padding)  # (B, T', D)
            if self.convs is not None:
                x = self.convs[i](x, real)
        logits = self.logits_probe(self.head(self.norm(x)), padding)  # (B, T', V)
        return logits.float().log_softmax(-1), lengths
