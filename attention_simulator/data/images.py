"""Image classification data through 🤗 datasets, with augmentation written in torch.

`digits` (default) is scikit-learn's bundled 8×8 handwritten digits: 1797 real images, no
download. `cifar10` and `imagenet` load by Hub id or from a local copy (`data.path`: an
`imagefolder` directory with one folder per split and one sub-folder per class, or a dataset
saved with `save_to_disk`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DatasetUnavailableError
from .loader import EpochBatchSampler, KeyedDataset, check_batch_sizes, eval_batches, make_loader, rows_source
from .sources import built_once, load_from_hub, local_root


@dataclass(frozen=True)
class ImageSource:
    hub_id: str | None
    image_column: str
    train_split: str
    eval_split: str
    max_value: float = 255.0  # pixel value that maps to 1.0


SOURCES = {
    "digits": ImageSource(None, "image", "train", "test", max_value=16.0),
    "cifar10": ImageSource("uoft-cs/cifar10", "img", "train", "test"),
    "imagenet": ImageSource("ILSVRC/imagenet-1k", "image", "train", "validation"),
}


def load_digits() -> datasets.DatasetDict:
    """scikit-learn's digits as a DatasetDict with a fixed, stratified 80/20 train/test split,
    built once and then read from datasets' cache (importing scikit-learn costs seconds)."""
    return built_once("digits/v1", _build_digits)


def _build_digits() -> datasets.DatasetDict:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    images, labels = sk_digits(return_X_y=True)
    features = datasets.Features(
        {"image": datasets.Array2D((8, 8), "uint8"), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels)

    def split(idx):
        return datasets.Dataset.from_dict(
            {"image": images[idx].reshape(-1, 8, 8).astype("uint8"), "label": labels[idx]}, features=features
        )

    return datasets.DatasetDict({"train": split(list(train)), "test": split(list(test))})


def load_image_dataset(name: str, path: str | None) -> datasets.DatasetDict:
    source = SOURCES[name]
    if name == "digits" and path is None:
        return load_digits()
    how_to = (
        f"Point data.path at a local copy: an imagefolder directory with {source.train_split}/ and "
        f"{source.eval_split}/ folders of class sub-folders, or a dataset saved with save_to_disk"
    )
    if path is not None:
        root = local_root(name, path, how_to)
        if (root / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(root))
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    return load_from_hub(name, source.hub_id, None, how_to)


# ---- augmentation (per image, C×H×W float in [0, 1]) -----------------------------------------------


def random_resized_crop(img, size: int, scale: tuple[float, float], ratio: tuple[float, float], g) -> torch.Tensor:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resize to size×size."""
    _, h, w = img.shape
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(*scale, generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=g).item())
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, (1,), generator=g).item()
            left = torch.randint(0, w - cw + 1, (1,), generator=g).item()
            return _resize(img[:, top : top + ch, left : left + cw], size, size)
    return center_crop(img, size, 1.0)  # no valid box found: fall back to the whole image


def center_crop(img, size: int, crop_fraction: float) -> torch.Tensor:
    """Resize the shorter side to size / crop_fraction, then take the central size×size."""
    _, h, w = img.shape
    short = round(size / crop_fraction)
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    img = _resize(img, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top : top + size, left : left + size]


def _resize(img, h: int, w: int) -> torch.Tensor:
    if img.shape[1:] == (h, w):
        return img
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


class ImageData:
    """Batches `{"images": (B, C, H, W) float, "labels": (B,) int64}` for classification."""

    kind = "images"

    def __init__(
        self,
        *,
        name: str = "digits",
        path: str | None = None,
        image_size: int,
        channels: int,
        num_classes: int,
        mean: list[float],
        std: list[float],
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        eval_crop: float = 0.875,
    ):
        check_batch_sizes(batch_size, eval_batch_size)
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"data.mean and data.std need {channels} values (data.channels), got {mean} / {std}.")
        if name not in SOURCES:
            raise ConfigError(f"data.name={name!r} is not an image dataset; choose one of {sorted(SOURCES)}.")
        self.name, self.path, self.source, self.splits = name, path, SOURCES[name], None
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.crop_scale, self.crop_ratio, self.hflip, self.eval_crop = (
            tuple(crop_scale),
            tuple(crop_ratio),
            hflip,
            eval_crop,
        )

    def prepare(self) -> ImageData:
        """The file work, once per object: load the dataset (downloaded or built on a machine's
        first run) and check its splits and classes. The trainer calls it after its start-up
        checks; the loaders call it first."""
        if self.splits is not None:
            return self
        splits = load_image_dataset(self.name, self.path)
        for split in (self.source.train_split, self.source.eval_split):
            if split not in splits:
                raise DatasetUnavailableError(f"Dataset {self.name!r} has no {split!r} split; found {list(splits)}.")
        found = getattr(splits[self.source.train_split].features["label"], "num_classes", None)
        if found is not None and found != self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes} but dataset {self.name!r} has {found} classes.")
        self.splits = splits
        return self

    def _pixels(self, img: torch.Tensor) -> torch.Tensor:
        """A decoded image (H, W), (C, H, W) or (H, W, C) as float (channels, H, W) in [0, 1]."""
        if img.ndim == 2:
            img = img[None]
        elif img.shape[-1] in (1, 3, 4) and img.shape[0] not in (1, 3, 4):
            img = img.permute(2, 0, 1)
        img = img[:3].float() / self.source.max_value
        if img.shape[0] != self.channels:
            img = img.mean(0, keepdim=True) if self.channels == 1 else img.expand(self.channels, -1, -1)
        return img

    def _batch(self, rows, generators, train: bool):
        images = []
        for img, g in zip(rows[self.source.image_column], generators):
            img = self._pixels(img)
            if train:
                img = random_resized_crop(img, self.image_size, self.crop_scale, self.crop_ratio, g)
                if self.hflip and torch.rand(1, generator=g).item() < 0.5:
                    img = img.flip(-1)
            else:
                img = center_crop(img, self.image_size, self.eval_crop)
            images.append((img - self.mean) / self.std)
        return {"images": torch.stack(images), "labels": torch.as_tensor(rows["label"], dtype=torch.long)}

    def _dataset(self, split: str, seed: int, train: bool) -> KeyedDataset:
        return KeyedDataset(rows_source(self.splits[split]), lambda r, g: self._batch(r, g, train), seed)

    def train_loader(self, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        dataset = self.prepare()._dataset(self.source.train_split, seed, train=True)
        sampler = EpochBatchSampler(len(dataset), self.batch_size, seed, start, rank, world_size)
        return make_loader(dataset, sampler, self.num_workers)

    def eval_loaders(self, rank: int = 0, world_size: int = 1) -> dict:
        """{"": the evaluation split's loader} (metrics eval/<name>)."""
        dataset = self.prepare()._dataset(self.source.eval_split, 0, train=False)
        batches = eval_batches(len(dataset), self.eval_batch_size, rank, world_size)
        return {"": make_loader(dataset, batches, self.num_workers)}

    @property
    def model_args(self) -> dict:
        """Nothing: the ViT configs take image size, channels and classes by interpolation."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1):
        """Nothing to restore: a batch is a function of its position (trainer's data_position)."""
