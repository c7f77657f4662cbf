"""Datasets for the A/B runs behind one call: ``load_dataset(name, root=..., seed=..., **options)``.

Vision datasets give ``ImageSplits`` (items: float image in [0, 1] of shape (C, H, W), or (C, T, H, W)
for clips, and an int label); text datasets give ``TextSplits`` (1-D int64 char ids). Every result
carries ``source``, saying where it came from, printed once per load. Hugging Face hub sources are
tried only when the hub answers a 3 s probe (never with ``online=False`` or ``HF_HUB_OFFLINE=1``);
offline defaults are generated in code, read from Debian packages, or taken from the standard library.
Generated and converted tensors are cached under ``root`` (``$LIERE_DATA_DIR``, else
``~/.cache/liere``) in files keyed by every option, written atomically.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from train import arrow, austen, clips3d

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(os.environ.get("LIERE_DATA_DIR", Path.home() / ".cache" / "liere"))
DEFAULT_DATASET = "arrow"
CACHE_VERSION = 1  # bump when a generator or a conversion changes, to invalidate caches
HUB_PROBE_TIMEOUT = 3.0
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TEXT_FRACTIONS = (0.9, 0.05, 0.05)
OFFLINE_IMAGE_DATASETS = "arrow, arrow-small, clips3d, digits, fashion-mnist (Debian), folder:PATH"


class DatasetUnavailable(RuntimeError):
    """No source of the requested dataset can be reached from here."""


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


# ---------------------------------------------------------------- caching and sources


def _cache_file(root: Path, name: str, **key: Any) -> Path:
    """``root/name_v1_k=v_....pt``: one file per combination of options."""
    parts = [name, f"v{CACHE_VERSION}", *(f"{k}={v}" for k, v in sorted(key.items()))]
    return root / ("_".join(parts).replace("/", "-").replace(" ", "") + ".pt")


def _cached(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load ``path`` if present, else ``build()`` and save it atomically (temp file + os.replace)."""
    if path.exists():
        log.info("reading cache %s", path)
        return torch.load(path, weights_only=True)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("wrote cache %s", path)
    return data


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _probe(host: str, port: int) -> bool:
    """TCP connect within HUB_PROBE_TIMEOUT, DNS included (run in a daemon thread, so it cannot hang)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT)
    return bool(result and result[0])


def hub_reachable(online: bool | None = None) -> bool:
    """Whether to try the Hugging Face hub: never for ``online=False`` or HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE set, always for ``online=True``, else when a quick TCP probe answers."""
    if online is not None:
        return online
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _probe(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))


def _hub_load(repo: str, online: bool | None) -> Any:
    """``datasets.load_dataset(repo)`` (a DatasetDict), or DatasetUnavailable without hanging."""
    if not hub_reachable(online):
        raise DatasetUnavailable("Hugging Face hub offline or unreachable")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    import datasets

    try:
        return datasets.load_dataset(repo)
    except Exception as e:  # any hub, network or format failure means: use the fallback
        raise DatasetUnavailable(f"Hugging Face {repo}: {type(e).__name__}: {e}") from e


def _split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """A seeded random partition of range(n) into parts of the given sizes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, list(sizes)))


def _fraction_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    val, test = int(n * fractions[1]), int(n * fractions[2])
    return n - val - test, val, test


# ---------------------------------------------------------------- vision


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


def _debian_fashion_mnist(allow_apt: bool) -> dict[str, Any]:
    """Fashion-MNIST from the Debian package's IDX files, installing it first if allowed (root only)."""
    missing = not any(FASHION_MNIST_DIR.glob("train-images-idx3-ubyte*"))
    if missing and allow_apt and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", FASHION_MNIST_PACKAGE], capture_output=True, timeout=600)
        missing = not any(FASHION_MNIST_DIR.glob("train-images-idx3-ubyte*"))
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST: no IDX files in {FASHION_MNIST_DIR}; install them with "
            f"`sudo apt-get install {FASHION_MNIST_PACKAGE}` (or pass allow_apt=True when running as root)"
        )
    return {
        "train": _idx_split(FASHION_MNIST_DIR, "train"),
        "test": _idx_split(FASHION_MNIST_DIR, "t10k"),
        "source": f"debian:{FASHION_MNIST_DIR}",
    }


# name -> (hub repo, image column, label column, PIL mode, number of classes)
HUB_IMAGE_DATASETS = {
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "image", "label", "L", 10),
    "cifar10": ("uoft-cs/cifar10", "img", "label", "RGB", 10),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label", "RGB", 100),
}


def _hub_images(name: str, online: bool | None) -> dict[str, Any]:
    """Official train/test splits of a hub image dataset as uint8 (N, C, H, W) tensors."""
    repo, image_col, label_col, mode, _ = HUB_IMAGE_DATASETS[name]
    dataset = _hub_load(repo, online)

    def convert(split: Any) -> dict[str, Tensor]:
        images = np.stack([np.asarray(im.convert(mode)) for im in split[image_col]])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return {"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.tensor(split[label_col])}

    return {"train": convert(dataset["train"]), "test": convert(dataset["test"]), "source": f"huggingface:{repo}"}


def _official_splits(data: dict[str, Any], val_size: int, seed: int, num_classes: int) -> ImageSplits:
    """Official test split as test; validation carved from train by seed."""
    full = TensorImageDataset.from_dict(data["train"])
    train_idx, val_idx = _split_indices(len(full), (len(full) - val_size, val_size), seed)
    test = TensorImageDataset.from_dict(data["test"])
    shape = tuple(test.images.shape[1:])
    return ImageSplits(full.subset(train_idx), full.subset(val_idx), test, num_classes, shape, data["source"])


def _hub_image_dataset(
    name: str, root: Path, seed: int, val_size: int, online: bool | None, offline: Callable[[], dict] | None
) -> ImageSplits:
    """Hub first, then the ``offline`` builder if any; converted tensors cached under ``root``."""

    def build() -> dict[str, Any]:
        try:
            return _hub_images(name, online)
        except DatasetUnavailable as e:
            if offline is None:
                raise DatasetUnavailable(
                    f"{name} has no offline source ({e}); offline alternatives: {OFFLINE_IMAGE_DATASETS}"
                ) from e
            log.info("%s: %s; using the offline source", name, e)
            return offline()

    return _official_splits(_cached(_cache_file(root, name), build), val_size, seed, HUB_IMAGE_DATASETS[name][4])


def load_fashion_mnist(
    root: Path, seed: int, *, val_size: int = 5000, online: bool | None = None, allow_apt: bool = False
) -> ImageSplits:
    """Fashion-MNIST 1x28x28, 10 classes: hub, else Debian ``dataset-fashion-mnist``."""
    return _hub_image_dataset(
        "fashion-mnist", root, seed, val_size, online, functools.partial(_debian_fashion_mnist, allow_apt)
    )


def load_cifar10(root: Path, seed: int, *, val_size: int = 5000, online: bool | None = None) -> ImageSplits:
    """CIFAR-10 3x32x32 from the hub (no offline source)."""
    return _hub_image_dataset("cifar10", root, seed, val_size, online, None)


def load_cifar100(root: Path, seed: int, *, val_size: int = 5000, online: bool | None = None) -> ImageSplits:
    """CIFAR-100 3x32x32, 100 fine classes, from the hub (no offline source)."""
    return _hub_image_dataset("cifar100", root, seed, val_size, online, None)


def _generated(
    name: str, generate: Callable[..., dict], num_classes: int, root: Path, seed: int, counts: dict[str, int], **opts
) -> ImageSplits:
    """Train/val/test from a seeded generator (split i uses seed (seed, i)), cached by all options."""
    described = ",".join(f"{k}={v}" for k, v in {"seed": seed, **opts}.items())

    def build() -> dict[str, Any]:
        splits = {
            split: {k: torch.from_numpy(v) for k, v in generate(n, **opts, seed=(seed, i)).items()}
            for i, (split, n) in enumerate(counts.items())
        }
        return {**splits, "source": f"generated:{name}({described})"}

    key = {"seed": seed, **opts, "n": "-".join(map(str, counts.values()))}
    data = _cached(_cache_file(root, name, **key), build)
    train, val, test = (TensorImageDataset.from_dict(data[s]) for s in counts)
    return ImageSplits(train, val, test, num_classes, tuple(train.images.shape[1:]), data["source"])


def load_arrow(
    root: Path,
    seed: int,
    *,
    image_size: int = 108,
    grid: int = 9,
    num_train: int = 20000,
    num_val: int = 2000,
    num_test: int = 2000,
) -> ImageSplits:
    """The arrow task (see ``train.arrow``): 1 x image_size x image_size, 8 direction classes."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    return _generated(
        "arrow", arrow.generate, len(arrow.DIRECTIONS), root, seed, counts, image_size=image_size, grid=grid
    )


def load_clips3d(
    root: Path,
    seed: int,
    *,
    frames: int = 8,
    size: int = 32,
    num_train: int = 10000,
    num_val: int = 1000,
    num_test: int = 1000,
) -> ImageSplits:
    """Moving-shape clips (see ``train.clips3d``): 1 x frames x size x size, 16 (shape, motion) classes."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    return _generated("clips3d", clips3d.generate, clips3d.NUM_CLASSES, root, seed, counts, frames=frames, size=size)


def load_digits(root: Path, seed: int, *, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> ImageSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as 1x8x8 floats in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    full = TensorImageDataset(
        torch.tensor(digits.images / 16, dtype=torch.float32)[:, None], torch.tensor(digits.target)
    )
    parts = _split_indices(len(full), _fraction_sizes(len(full), fractions), seed)
    train, val, test = (full.subset(i) for i in parts)
    return ImageSplits(train, val, test, 10, (1, 8, 8), "sklearn:load_digits")


def load_folder(
    root: Path,
    seed: int,
    *,
    path: str | Path,
    image_size: int = 64,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> ImageSplits:
    """An image folder (one subfolder per class) read lazily with PIL, resized to 3 x image_size^2."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    resize = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    full = ImageFolder(str(path), transform=resize)
    train, val, test = (
        Subset(full, i.tolist()) for i in _split_indices(len(full), _fraction_sizes(len(full), fractions), seed)
    )
    return ImageSplits(train, val, test, len(full.classes), (3, image_size, image_size), f"folder:{path}")


# ---------------------------------------------------------------- text


def text_splits(text: str, source: str, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Char-level ids of ``text`` (vocab = sorted distinct chars), split into contiguous parts."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    codes, ids = np.unique(codepoints, return_inverse=True)
    train, val, test = torch.split(torch.from_numpy(ids.astype(np.int64)), _fraction_sizes(len(ids), fractions))
    return TextSplits(train, val, test, [chr(c) for c in codes], source)


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_pydoc(root: Path, seed: int, *, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Python's bundled help topics (~465K chars): a tiny always-available corpus."""
    return text_splits(_pydoc_text(), "pydoc_data.topics", fractions)


def load_austen(root: Path, seed: int, *, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Jane Austen's six novels (~4.0M chars) from Debian ``r-cran-janeaustenr``, else pydoc topics."""
    try:
        return text_splits(austen.austen_text(root), f"debian:{austen.PACKAGE}", fractions)
    except (OSError, ValueError) as e:
        return text_splits(_pydoc_text(), f"pydoc_data.topics (fallback: austen unavailable: {e})", fractions)


def load_shakespeare(
    root: Path, seed: int, *, online: bool | None = None, fractions: tuple[float, float, float] = TEXT_FRACTIONS
) -> TextSplits:
    """Tiny Shakespeare (~1.1M chars) from the hub, else the Austen corpus."""
    repo = "karpathy/tiny_shakespeare"
    try:
        dataset = _hub_load(repo, online)
    except DatasetUnavailable as e:
        splits = load_austen(root, seed, fractions=fractions)
        return replace(splits, source=f"{splits.source} (fallback: shakespeare unavailable: {e})")
    text = "".join(row["text"] for split in ("train", "validation", "test") for row in dataset[split])
    return text_splits(text, f"huggingface:{repo}", fractions)


def load_text(
    root: Path, seed: int, *, path: str | Path, fractions: tuple[float, float, float] = TEXT_FRACTIONS
) -> TextSplits:
    """A local UTF-8 text file, char-level."""
    return text_splits(Path(path).read_text(encoding="utf-8"), f"text:{path}", fractions)


def char_batches(
    tokens: Tensor, context: int, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random windows of a 1-D token tensor: x, y (batch_size, context), y is x shifted by one token."""
    if len(tokens) <= context:
        raise ValueError(f"{len(tokens)} tokens are too few for context {context}")
    start = torch.randint(len(tokens) - context, (batch_size, 1), generator=generator).to(tokens.device)
    window = tokens[start + torch.arange(context + 1, device=tokens.device)]
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., ImageSplits | TextSplits]] = {
    "arrow": load_arrow,
    "arrow-small": functools.partial(load_arrow, image_size=48, grid=6),
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "clips3d": load_clips3d,
    "folder": load_folder,
    "austen": load_austen,
    "shakespeare": load_shakespeare,
    "pydoc": load_pydoc,
    "text": load_text,
}
PATH_DATASETS = ("folder", "text")  # used as "folder:PATH", "text:PATH"


def describe(splits: ImageSplits | TextSplits) -> str:
    """One line: source and split sizes."""
    if isinstance(splits, TextSplits):
        sizes = "/".join(str(len(t)) for t in (splits.train, splits.val, splits.test))
        return f"{splits.source}: {sizes} chars (train/val/test), vocab {len(splits.vocab)}"
    sizes = "/".join(str(len(d)) for d in (splits.train, splits.val, splits.test))
    return f"{splits.source}: {sizes} images {splits.image_shape} (train/val/test), {splits.num_classes} classes"


def load_dataset(
    name: str = DEFAULT_DATASET, *, root: str | Path = DEFAULT_ROOT, seed: int = 0, **options: Any
) -> ImageSplits | TextSplits:
    """Load a dataset by registry name (``DATASETS``; ``folder:PATH`` and ``text:PATH`` take a path).

    ``options`` go to the loader (e.g. ``image_size``, ``num_train``, ``online``); same name, seed and
    options give identical data.
    """
    base, _, path = name.partition(":")
    if base not in DATASETS or bool(path) != (base in PATH_DATASETS):
        valid = [f"{n}:PATH" if n in PATH_DATASETS else n for n in DATASETS]
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(valid)}")
    if path:
        options["path"] = path
    splits = DATASETS[base](Path(root), seed, **options)
    print(f"[data] {name}: {describe(splits)}", flush=True)
    return splits
