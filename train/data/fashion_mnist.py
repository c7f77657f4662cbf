"""Fashion-MNIST (1x28x28, 10 classes): the Hugging Face hub when it answers, else the IDX files of the Debian
package ``dataset-fashion-mnist`` (installed on request: ``python -m train.data install fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from train.data import cache
from train.data.hub import Hub, fetch
from train.data.source import Source
from train.data.splits import DatasetUnavailable, ImageSplits, official_splits

NAME = "fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: str | Path) -> np.ndarray:
    """Array from an IDX file (MNIST format), gzip-compressed or raw."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[:2] != b"\0\0" or raw[2] not in dtypes:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(dtypes[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_split(directory: Path, prefix: str) -> dict[str, Tensor]:
    def find(stem: str) -> Path:
        gz = directory / f"{stem}.gz"
        return gz if gz.exists() else directory / stem

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    return {"images": torch.from_numpy(images)[:, None], "labels": torch.from_numpy(labels.astype(np.int64))}


def _debian(hub_error: str) -> dict[str, Any]:
    """The Debian package's IDX files, or DatasetUnavailable saying how to install them."""
    if not any(DEBIAN_DIR.glob("train-images-idx3-ubyte*")):
        raise DatasetUnavailable(
            f"{hub_error}, and no IDX files are in {DEBIAN_DIR}: install them with "
            f"`sudo apt-get install {PACKAGE}` (or `python -m train.data install {NAME}`)"
        )
    return {"train": _idx_split(DEBIAN_DIR, "train"), "test": _idx_split(DEBIAN_DIR, "t10k"),
            "source": f"debian:{DEBIAN_DIR}"}  # fmt: skip


def load(root: Path, seed: int, *, val_size: int = 5000, hub: Hub | None = None) -> ImageSplits:
    """The official test split; validation carved from train by seed. Hub first, then the Debian files."""
    try:
        data = fetch(NAME, root, hub)
    except DatasetUnavailable as err:
        hub_error = str(err)
        data = cache.cached(cache.cache_file(root, NAME), lambda: _debian(hub_error), keys=("train", "test", "source"))
    return official_splits(data, val_size, seed, 10)


SOURCE = Source(
    NAME, "image", load, "Fashion-MNIST, 1x28x28, 10 classes; Hugging Face hub, else Debian dataset-fashion-mnist",
    offline=f"Debian package {PACKAGE}", debian_packages=(PACKAGE,),
)  # fmt: skip
