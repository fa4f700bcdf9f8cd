"""Masked autoencoder (He et al. 2022): a ViT encoder that sees a random quarter of an image's
patches, a light decoder that predicts the pixels of the rest; and the linear probe that scores
the pretrained encoder's features (frozen) on classification."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf
from torch import nn

from ..attention import AttentionConfig, sincos_2d
from ..checkpoint import is_sharded, latest_valid, load_checkpoint
from ..config import build
from ..errors import CheckpointError, ConfigError
from ..probes import Probe
from .trunk import Trunk, add_pos_embed, init_weights, trunk_options
from .vit import patch_grid, patchify

EVAL_MASK_SEED = 0


def gather_patches(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, K) -> (B, K, C): the rows `index` of each sample."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


@trunk_options
class MAEEncoder(nn.Module):
    """A ViT on the visible patches only: images (B, C, H, W), visible (B, K) patch indices ->
    normalised tokens (B, 1+K, D) with a class token (pool=cls), else (B, K, D). Positions come
    from a fixed 2-D sin-cos table indexed by patch, as in MAE: the visible patches are a subset,
    so a token's place in the sequence says nothing about where its patch is."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, pool: str = "cls", **trunk):
        super().__init__()
        if pool not in ("cls", "avg"):
            raise ConfigError(f"model.pool={pool!r}: use 'cls' (class token) or 'avg' (global average pooling).")
        position = trunk.get("attention", AttentionConfig()).position
        if position != "none":
            raise ConfigError(
                f"attention.position={position!r}: a masked autoencoder's sequences hold a random subset of the "
                "patches, so sequence positions are not patch positions; it places patches with its sin-cos tables. "
                "Use attention.position=none."
            )
        grid, dim = patch_grid(img_size, patch_size), trunk["dim"]
        self.patch_size, self.num_patches = patch_size, grid * grid
        self.patch_embed = nn.Linear(in_chans * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        add_pos_embed(self, "sincos", grid * grid, dim, lambda: sincos_2d(grid, dim))  # (1, N, D)
        self.blocks = Trunk(**trunk)
        self.norm = self.blocks.final_norm()

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        patches = patchify(images, self.patch_size)  # (B, N, p*p*C)
        positions = self.pos_embed.expand(patches.shape[0], -1, -1)  # (B, N, D)
        if visible is not None:  # the masked patches' pixels are dropped before anything reads them
            patches, positions = gather_patches(patches, visible), gather_patches(positions, visible)  # (B, K, ·)
        x = self.patch_embed(patches) + positions  # (B, K, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+K, D)
        return self.norm(self.blocks(x))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The whole image's pooled representation (B, D): the class token's, or the patches' mean."""
        x = self(images)  # (B, [1+]N, D)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)


class MAEDecoder(nn.Module):
    """Encoder tokens (B, [1+]K, D_enc) and the visible indices (B, K) -> pixels of every patch
    (B, N, out_dim): mask tokens fill the patches the encoder did not see, every token gets its
    patch's position (a sin-cos table of the decoder's width), a few narrow blocks mix them."""

    def __init__(self, *, grid: int, encoder_dim: int, out_dim: int, **trunk):
        super().__init__()
        dim = trunk["dim"]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        add_pos_embed(self, "sincos", grid * grid, dim, lambda: sincos_2d(grid, dim))  # (1, N, Dd)
        self.blocks = Trunk(**trunk)
        self.norm = self.blocks.final_norm()
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # (B, [1+]K, Dd)
        extra = x.shape[1] - visible.shape[1]  # 1 with a class token, else 0
        b, n, width = x.shape[0], self.pos_embed.shape[1], x.shape[2]
        index = visible[..., None].expand(-1, -1, width)  # (B, K, Dd)
        tokens = self.mask_token.expand(b, n, -1).scatter(1, index, x[:, extra:])  # (B, N, Dd): each in its place
        x = torch.cat([x[:, :extra], tokens + self.pos_embed], dim=1)  # (B, [1+]N, Dd)
        return self.pred(self.norm(self.blocks(x))[:, extra:])  # (B, N, out_dim)


class Reconstruction(NamedTuple):
    pred: torch.Tensor  # (B, N, p*p*C) predicted pixels of every patch
    patches: torch.Tensor  # (B, N, p*p*C) the image's pixels, patch by patch (the targets)
    masked: torch.Tensor  # (B, N) bool: True where the encoder did not see the patch


@trunk_options
class MaskedAutoencoder(nn.Module):
    """images (B, C, H, W) -> Reconstruction: round(mask_ratio · N) patches of each image are
    hidden from the encoder, and the decoder predicts every patch's pixels (the task scores the
    hidden ones). The encoder takes the ViT's options; the decoder is narrower and shallower,
    with the encoder's block options except stochastic depth."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, pool: str = "cls", mask_ratio: float = 0.75,
                 decoder_dim: int = 32, decoder_depth: int = 2, decoder_heads: int = 4, **trunk):  # fmt: skip
        super().__init__()
        self.encoder = MAEEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, pool=pool, **trunk)
        n = self.encoder.num_patches
        masked = round(mask_ratio * n)
        if not 0 < masked < n:
            raise ConfigError(
                f"model.mask_ratio={mask_ratio} hides {masked} of the {n} patches; it must hide at least one and leave "
                f"at least one visible: pick a ratio in ({0.5 / n:.3g}, {1 - 0.5 / n:.3g})."
            )
        self.num_visible = n - masked
        narrow = dict(dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads, drop_path=0.0)
        self.decoder = MAEDecoder(grid=patch_grid(img_size, patch_size), encoder_dim=trunk["dim"],
                                  out_dim=in_chans * patch_size**2, **(trunk | narrow))  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self):
        self.apply(init_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)

    def random_masking(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, K) indices of the patches each image shows the encoder: the first K of a random
        permutation, so exactly K = N − round(mask_ratio · N) per image, uniformly chosen.

        Training draws from the global generator, as dropout and drop-path do: the trainer seeds
        it, gives each data-parallel process its own stream and checkpoints it, so a resumed run
        masks exactly as an uninterrupted one. Evaluation uses a fixed generator: every
        evaluation scores the same patches, and evaluating never shifts the training stream."""
        generator = None if self.training else torch.Generator(device).manual_seed(EVAL_MASK_SEED)
        noise = torch.rand(batch, self.encoder.num_patches, generator=generator, device=device)  # (B, N)
        return noise.argsort(dim=1)[:, : self.num_visible]  # (B, K)

    def forward(self, images: torch.Tensor) -> Reconstruction:
        b = images.shape[0]
        visible = self.random_masking(b, images.device)  # (B, K)
        latent = self.encoder(images, visible)  # (B, [1+]K, D)
        pred = self.decoder(latent, visible)  # (B, N, p*p*C)
        masked = torch.ones(b, self.encoder.num_patches, dtype=torch.bool, device=images.device)
        masked = masked.scatter(1, visible, False)  # (B, N)
        return Reconstruction(pred, patchify(images, self.encoder.patch_size), masked)


# ---- linear probe ----------------------------------------------------------------------------------

PRETRAIN_FIRST = (
    "Pretrain first, e.g. python -m attention_simulator.train +experiment=mae_sigmoid, then pass its run directory "
    "(or a checkpoints/step_* in it): model.checkpoint=outputs/mae_sigmoid/RUN"
)
# off in a frozen (eval-mode) encoder, or training-only: need not match
NEED_NOT_MATCH = {"attention.attn_drop", "attention.proj_drop", "model.drop_path", "model.activation_checkpointing"}


@trunk_options
class MAELinearProbe(nn.Module):
    """images (B, C, H, W) -> logits (B, num_classes): a linear classifier on the pooled features
    of a pretrained MAE encoder (loaded from `checkpoint`, frozen, always in eval mode). As in MAE's
    protocol, a BatchNorm without affine parameters puts the features on one scale first."""

    def __init__(self, *, checkpoint: str | None, num_classes: int, img_size: int, patch_size: int, in_chans: int,
                 pool: str = "cls", **trunk):  # fmt: skip
        super().__init__()
        options = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, pool=pool, **trunk)
        self.encoder = MAEEncoder(**options)
        load_pretrained(self.encoder, checkpoint, options)
        self.encoder.requires_grad_(False)
        self.feature_norm = nn.BatchNorm1d(trunk["dim"], affine=False)
        self.head = nn.Linear(trunk["dim"], num_classes)
        init_weights(self.head, std=0.01)
        self.logits_probe = Probe("logits")

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop-path or dropout, ever
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder.features(images)  # (B, D)
        return self.logits_probe(self.head(self.feature_norm(features)))  # (B, num_classes)


def load_pretrained(encoder: MAEEncoder, checkpoint: str | None, options: dict):
    """Load `encoder` from `checkpoint` (a checkpoint file or .dcp directory, or a run or
    checkpoints directory: its newest), built with the probe's model and attention `options`.
    Where the checkpoint sits in a run directory, they are first checked against the run's
    config: that catches what the weights cannot show (heads, the attention's options)."""
    if checkpoint is None:
        raise ConfigError(f"model.checkpoint is not set: the linear probe needs a pretrained encoder. {PRETRAIN_FIRST}")
    path = Path(checkpoint).expanduser()
    if path.is_dir() and not is_sharded(path):
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = latest_valid(directory)
        if path is None:
            raise CheckpointError(f"model.checkpoint={checkpoint!r}: no complete checkpoint in {str(directory)!r}. "
                                  f"{PRETRAIN_FIRST}")  # fmt: skip
    model = load_checkpoint(path, fix=f"model.checkpoint={checkpoint!r}: {PRETRAIN_FIRST}")["model"]
    weights = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    if not weights:
        raise CheckpointError(f"model.checkpoint={checkpoint!r}: {str(path)!r} holds no MAE encoder. {PRETRAIN_FIRST}")
    mismatch = _differences_from_pretraining(path, options) or _differences_in_shape(weights, encoder)
    if not mismatch:
        encoder.load_state_dict(weights)
        return
    raise CheckpointError(
        f"model.checkpoint={checkpoint!r} does not fit this probe: {mismatch}. Probe with the pretraining's model "
        "and attention options: the mae_*_probe experiment of that pretraining (+experiment=mae_sigmoid_probe "
        "for +experiment=mae_sigmoid), with the same overrides."
    )


def _differences_from_pretraining(path: Path, options: dict) -> str:
    """'model.num_heads=4 there, 2 here, …' for the options this probe and the pretraining run
    (its .hydra/config.yaml, when `path` is RUN/checkpoints/step_*) both set differently."""
    config_path = path.parent.parent / ".hydra" / "config.yaml"
    if path.parent.name != "checkpoints" or not config_path.is_file():
        return ""
    saved = OmegaConf.load(config_path)
    theirs = {f"model.{k}": v for k, v in OmegaConf.to_container(saved.model, resolve=True).items()}
    theirs |= {f"attention.{k}": v for k, v in dataclasses.asdict(build(saved.attention)).items()}
    attention = options.get("attention", AttentionConfig())
    mine = {f"model.{k}": v for k, v in options.items() if k != "attention"} | {
        f"attention.{k}": v for k, v in dataclasses.asdict(attention).items()
    }
    differ = [f"{k}={theirs[k]!r} there, {v!r} here" for k, v in mine.items()
              if k in theirs and theirs[k] != v and k not in NEED_NOT_MATCH]  # fmt: skip
    return ", ".join(differ)


def _differences_in_shape(weights: dict[str, torch.Tensor], encoder: MAEEncoder) -> str:
    """'blocks.0.attn.qkv.weight is (192, 64) there, (96, 32) here, …' (the first three)."""
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    mine = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    differ = [f"{k} is {theirs.get(k, 'missing')} there, {mine.get(k, 'missing')} here"
              for k in dict.fromkeys([*mine, *theirs]) if theirs.get(k) != mine.get(k)]  # fmt: skip
    return ", ".join(differ[:3]) + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else "")
