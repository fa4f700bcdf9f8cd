"""Batching is reproducible and resumable; digits is the real dataset; augmentation is sane."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_digits

from attention_simulator.data.images import ImageData, center_crop, load_digits, random_resized_crop
from attention_simulator.data.loader import EpochBatchSampler, eval_batches, seed_for


def digits_data(**kw):
    args = dict(
        image_size=8, channels=1, num_classes=10, mean=[0.3], std=[0.4], batch_size=32, hflip=False, eval_crop=1.0
    )
    return ImageData(**(args | kw))


def test_digits_is_sklearn_digits_with_a_fixed_disjoint_split():
    splits = load_digits()
    assert (len(splits["train"]), len(splits["test"])) == (1437, 360)
    images, labels = sk_digits(return_X_y=True)
    train = np.array(splits["train"]["image"]).reshape(-1, 64)
    test = np.array(splits["test"]["image"]).reshape(-1, 64)
    # a partition: every one of the 1797 images (with its label) in exactly one split
    everything = Counter(zip(map(tuple, images.astype("uint8")), labels.tolist()))
    parts = [
        Counter(zip(map(tuple, x), split["label"])) for x, split in ((train, splits["train"]), (test, splits["test"]))
    ]
    assert parts[0] + parts[1] == everything
    assert np.bincount(splits["test"]["label"]).min() >= 35  # stratified: every digit is tested
    assert load_digits()["test"]["label"] == splits["test"]["label"]  # fixed


def test_sampler_covers_each_epoch_once_per_rank():
    sampler = EpochBatchSampler(10, batch_size=2, seed=3, world_size=2, rank=0)
    other = EpochBatchSampler(10, batch_size=2, seed=3, world_size=2, rank=1)
    first, second = iter(sampler), iter(other)
    keys = [k for _ in range(2) for k in next(first) + next(second)]  # 2 batches x 2 ranks x 2 = 8 of 10
    assert len({i for _, i in keys}) == 8 and {e for e, _ in keys} == {0}
    assert next(first)[0][0] == 1  # the third batch starts epoch 1 (drop_last)


def test_sampler_start_equals_skipping():
    it = iter(EpochBatchSampler(50, 8, seed=1))
    skipped = [next(it) for _ in range(9)][-1]
    assert next(iter(EpochBatchSampler(50, 8, seed=1, start=8))) == skipped


def test_eval_batches_cover_everything_once():
    keys = [i for b in eval_batches(10, 3, rank=1, world_size=2) for _, i in b]
    assert keys == [1, 3, 5, 7, 9]


def test_seed_for_separates_streams():
    assert len({seed_for(0, e, i) for e in range(20) for i in range(200)}) == 4000


def test_batches_are_a_function_of_position_not_of_history():
    data = digits_data()
    loader = iter(data.train_loader(seed=7))
    batches = [next(loader) for _ in range(3)]
    resumed = next(iter(data.train_loader(seed=7, start=2)))
    assert torch.equal(batches[2]["images"], resumed["images"])
    assert not torch.equal(batches[0]["images"], batches[1]["images"])
    with_workers = next(iter(digits_data(num_workers=2).train_loader(seed=7, start=2)))
    assert torch.equal(with_workers["images"], resumed["images"])


def test_eval_images_are_the_normalised_pixels():
    data = digits_data()
    batch = next(iter(data.eval_loaders()[""]))
    raw = torch.tensor(np.array(load_digits()["test"]["image"][:4]), dtype=torch.float32) / 16
    torch.testing.assert_close(batch["images"][:4, 0], (raw - 0.3) / 0.4)


def test_random_resized_crop_and_center_crop():
    g = torch.Generator().manual_seed(0)
    img = torch.arange(3 * 40 * 60, dtype=torch.float32).view(3, 40, 60)
    out = random_resized_crop(img, 16, (0.2, 0.5), (0.75, 1.33), g)
    assert out.shape == (3, 16, 16)
    assert img.min() <= out.min() and out.max() <= img.max()
    full = random_resized_crop(img[:, :16, :16], 16, (1.0, 1.0), (1.0, 1.0), g)
    assert torch.equal(full, img[:, :16, :16])  # the whole image at its own size is untouched
    center = center_crop(img, 20, crop_fraction=1.0)  # shorter side 40 -> 20: a 2x downscale
    assert center.shape == (3, 20, 20)
    assert center.mean().item() == pytest.approx(img[:, :, 10:50].mean().item(), rel=1e-3)
