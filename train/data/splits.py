"""What every source returns: image splits (``ImageSplits``) or a char-level corpus (``TextSplits``), and the
seeded split helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

TEXT_FRACTIONS = (0.9, 0.05, 0.05)


class DatasetUnavailable(ValueError):
    """No source of the requested dataset can be reached from here; the one-line message says what to do.

    A ``ValueError``: like a bad option, the fix is the user's (another dataset, a network, a package), so the
    command-line tools print it as one ``error:`` line."""


class TensorImageDataset(Dataset):
    """In-memory images: ``images`` (N, C, ...) uint8 (scaled to [0, 1] on access) or float,
    ``labels`` (N,) int64, ``meta`` per-sample extras (e.g. the arrow layout), each indexed by sample."""

    def __init__(self, images: Tensor, labels: Tensor, meta: dict[str, Tensor] | None = None):
        self.images, self.labels, self.meta = images, labels.long(), meta or {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        return (x.float() / 255 if x.dtype == torch.uint8 else x.float()), int(self.labels[i])

    def subset(self, index: Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[index], self.labels[index], {k: v[index] for k, v in self.meta.items()})

    @classmethod
    def from_dict(cls, split: dict[str, Tensor]) -> TensorImageDataset:
        """From ``{"images": ..., "labels": ..., **meta}``."""
        meta = {k: v for k, v in split.items() if k not in ("images", "labels")}
        return cls(split["images"], split["labels"], meta)


@dataclass
class ImageSplits:
    """Vision splits; items are (image float tensor (C, H, W) or (C, T, H, W), int label)."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    image_shape: tuple[int, ...]
    source: str


@dataclass
class TextSplits:
    """Char-level corpus: contiguous 1-D int64 id tensors and the id -> char table."""

    train: Tensor
    val: Tensor
    test: Tensor
    vocab: list[str]
    source: str


def split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """A seeded random partition of range(n) into parts of the given sizes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, list(sizes)))


def fraction_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test sizes of ``n`` items: val and test rounded down, train takes the rest."""
    val, test = int(n * fractions[1]), int(n * fractions[2])
    return n - val - test, val, test


def official_splits(data: dict, val_size: int, seed: int, num_classes: int) -> ImageSplits:
    """``data["test"]`` as test; validation carved from ``data["train"]`` by seed (tensor dicts, see from_dict)."""
    full = TensorImageDataset.from_dict(data["train"])
    train_idx, val_idx = split_indices(len(full), (len(full) - val_size, val_size), seed)
    test = TensorImageDataset.from_dict(data["test"])
    shape = tuple(test.images.shape[1:])
    return ImageSplits(full.subset(train_idx), full.subset(val_idx), test, num_classes, shape, data["source"])


def text_splits(text: str, source: str, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Char-level ids of ``text`` (vocab = sorted distinct chars), split into contiguous parts."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    codes, ids = np.unique(codepoints, return_inverse=True)
    train, val, test = torch.split(torch.from_numpy(ids.astype(np.int64)), fraction_sizes(len(ids), fractions))
    return TextSplits(train, val, test, [chr(c) for c in codes], source)


def char_batches(
    tokens: Tensor, context: int, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random windows of a 1-D token tensor: x, y (batch_size, context), y is x shifted by one token."""
    if len(tokens) <= context:
        raise ValueError(f"{len(tokens)} tokens are too few for context {context}")
    start = torch.randint(len(tokens) - context, (batch_size, 1), generator=generator).to(tokens.device)
    window = tokens[start + torch.arange(context + 1, device=tokens.device)]
    return window[:, :-1], window[:, 1:]


def split_sizes(splits: ImageSplits | TextSplits) -> dict[str, int]:
    """``{"train": n, "val": n, "test": n}``: images (or clips), or characters (= tokens) for text."""
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}


def size_unit(splits: ImageSplits | TextSplits) -> str:
    """What ``split_sizes`` counts: ``"chars"`` (char-level text: one token per character) or ``"images"``."""
    return "chars" if isinstance(splits, TextSplits) else "images"


def describe(splits: ImageSplits | TextSplits) -> str:
    """One line: source and split sizes."""
    sizes = "/".join(str(n) for n in split_sizes(splits).values())
    if isinstance(splits, TextSplits):
        return f"{splits.source}: {sizes} chars (train/val/test), vocab {len(splits.vocab)}"
    return f"{splits.source}: {sizes} images {splits.image_shape} (train/val/test), {splits.num_classes} classes"
