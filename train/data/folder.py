"""A local image folder (``folder:PATH``, one subfolder per class), read lazily with PIL via torchvision."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch.utils.data import Subset

from train.data.source import Source
from train.data.splits import ImageSplits, fraction_sizes, split_indices

MAX_FILES = 2_000_000  # files a folder:PATH data set may hold (ImageNet's train split: 1.28 M)
MAX_SCAN_S = 120.0  # seconds its scan may take


def check_size(path: Path) -> int:
    """Walk ``path`` as ``ImageFolder`` will (following links) within ``MAX_FILES`` files and ``MAX_SCAN_S``
    seconds; the number of files, or ``ValueError`` naming the folder (``/proc/self`` links to the whole tree)."""
    if not path.is_dir():
        raise ValueError(f"folder:PATH: {path} is not a folder; expected one subfolder of images per class")
    deadline, files = time.monotonic() + MAX_SCAN_S, 0
    for _, _, names in os.walk(path, followlinks=True):
        files += len(names)
        if files > MAX_FILES:
            raise ValueError(f"folder:PATH: {path} holds more than {MAX_FILES} files (following links)")
        if time.monotonic() > deadline:
            raise ValueError(f"folder:PATH: scanning {path} took over {MAX_SCAN_S:g} s ({files} files so far)")
    return files


def load(
    root: Path,
    seed: int,
    *,
    path: str | Path,
    image_size: int = 64,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> ImageSplits:
    """Images resized to 3 x image_size x image_size; seeded train/val/test split by ``fractions``."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    resize = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    check_size(Path(path))
    full = ImageFolder(str(path), transform=resize)
    parts = split_indices(len(full), fraction_sizes(len(full), fractions), seed)
    train, val, test = (Subset(full, i.tolist()) for i in parts)
    return ImageSplits(train, val, test, len(full.classes), (3, image_size, image_size), f"folder:{path}")


SOURCE = Source(
    "folder", "image", load, "a local image folder, one subfolder per class (resized to 64 px; --image-size)",
    offline="local folder", takes_path=True,
)  # fmt: skip
