"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""

from __future__ import annotations

from pathlib import Path

import torch

from train.data.source import Source
from train.data.splits import ImageSplits, TensorImageDataset, fraction_sizes, split_indices


def load(root: Path, seed: int, *, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> ImageSplits:
    """1x8x8 floats in [0, 1]; seeded train/val/test split by ``fractions``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16, dtype=torch.float32)[:, None]
    full = TensorImageDataset(images, torch.tensor(digits.target))
    train, val, test = (full.subset(i) for i in split_indices(len(full), fraction_sizes(len(full), fractions), seed))
    return ImageSplits(train, val, test, 10, (1, 8, 8), "sklearn:load_digits")


SOURCE = Source("digits", "image", load, "8x8 handwritten digits, 1797 images (tests, smoke runs)", offline="sklearn")
