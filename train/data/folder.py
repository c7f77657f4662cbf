"""A local image folder (``folder:PATH``, one subfolder per class), read lazily with PIL via torchvision."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from train.data.source import Source
from train.data.splits import ImageSplits, fraction_sizes, split_indices


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
    full = ImageFolder(str(path), transform=resize)
    parts = split_indices(len(full), fraction_sizes(len(full), fractions), seed)
    train, val, test = (Subset(full, i.tolist()) for i in parts)
    return ImageSplits(train, val, test, len(full.classes), (3, image_size, image_size), f"folder:{path}")


SOURCE = Source(
    "folder", "image", load, "a local image folder, one subfolder per class (resized to 64 px)",
    offline="local folder", takes_path=True,
)  # fmt: skip
