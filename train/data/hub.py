"""Datasets from the Hugging Face hub (``datasets``), every attempt bounded in time, and the hub-only sources.

An attempt (``fetch``) first asks the hub for the dataset's API page and gives up unless it answers within
``Hub.timeout`` seconds (DNS included). Then a child process, ``python -m train.data download NAME``,
downloads and converts the dataset into the data cache; it is killed after ``Hub.deadline`` seconds in
all. The child's environment carries the endpoint and HTTP timeouts: this process's is never changed.
A server that accepts connections but never answers therefore costs ``timeout`` seconds, a stalled
download ``deadline`` seconds; then the caller's offline fallback runs, or ``DatasetUnavailable`` says
what to do.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import austen, cache
from train.data.source import Source
from train.data.splits import TEXT_FRACTIONS, DatasetUnavailable, ImageSplits, TextSplits, official_splits, text_splits

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where ``python -m train.data`` runs from


@dataclass(frozen=True)
class Hub:
    """Where the hub is and how long to wait for it.

    ``online``: False never tries the hub, True always does, None tries it unless ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` is set. ``timeout``: seconds for the first answer; ``deadline``: seconds for a
    whole download and conversion.
    """

    endpoint: str = DEFAULT_ENDPOINT
    online: bool | None = None
    timeout: float = 10.0
    deadline: float = 1800.0

    @classmethod
    def from_env(cls, **changes: Any) -> Hub:
        """Settings from ``HF_ENDPOINT`` and the offline flags, then ``changes``."""
        offline = any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in OFFLINE_FLAGS)
        hub = cls(endpoint=os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT, online=False if offline else None)
        return replace(hub, **changes)


@dataclass(frozen=True)
class HubDataset:
    """A hub repository, how to turn its ``DatasetDict`` into the cached dict, and that dict's entries."""

    repo: str
    convert: Callable[[Any], dict[str, Any]]
    keys: tuple[str, ...] = ("train", "test", "source")


def _image_converter(image_column: str, label_column: str, mode: str) -> Callable[[Any], dict[str, Any]]:
    """Official train/test splits as uint8 (N, C, H, W) images and int64 labels."""

    def split(rows: Any) -> dict[str, torch.Tensor]:
        images = np.stack([np.asarray(im.convert(mode)) for im in rows[image_column]])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return {"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.tensor(rows[label_column])}

    return lambda dataset: {"train": split(dataset["train"]), "test": split(dataset["test"])}


def _text(dataset: Any) -> dict[str, Any]:
    return {"text": "".join(row["text"] for split in ("train", "validation", "test") for row in dataset[split])}


HUB_DATASETS = {
    "fashion-mnist": HubDataset("zalando-datasets/fashion_mnist", _image_converter("image", "label", "L")),
    "cifar10": HubDataset("uoft-cs/cifar10", _image_converter("img", "label", "RGB")),
    "cifar100": HubDataset("uoft-cs/cifar100", _image_converter("img", "fine_label", "RGB")),
    "shakespeare": HubDataset("karpathy/tiny_shakespeare", _text, keys=("text", "source")),
}


def _within(seconds: float, call: Callable[[], None]) -> None:
    """Run ``call`` in a daemon thread; TimeoutError if it has not returned after ``seconds`` (it may block in
    DNS, which no socket timeout covers). Exceptions from ``call`` propagate."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if errors:
        raise errors[0]


@functools.lru_cache(maxsize=64)
def _unanswered(endpoint: str, repo: str, timeout: float) -> str | None:
    """Why the hub at ``endpoint`` is not usable for ``repo`` (None: it answered), within ``timeout`` s."""

    def ask() -> None:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/api/datasets/{repo}", timeout=timeout) as response:
            response.read(1)

    try:
        _within(timeout, ask)
    except TimeoutError:
        return f"the Hugging Face hub at {endpoint} did not answer within {timeout:g} s"
    except (OSError, ValueError) as err:  # URLError, HTTPError, refused, bad endpoint
        return f"the Hugging Face hub at {endpoint} is unreachable ({getattr(err, 'reason', err)})"
    return None


def fetch(name: str, root: Path, hub: Hub | None = None) -> dict[str, Any]:
    """The cached hub dataset ``name`` (see ``HUB_DATASETS``), downloaded first if need be, within the deadline."""
    hub = hub or Hub.from_env()
    path, (repo, keys) = cache.cache_file(root, name), (HUB_DATASETS[name].repo, HUB_DATASETS[name].keys)
    data = cache.read(path, keys)
    if data is not None:
        return data
    if hub.online is False:
        raise DatasetUnavailable("the Hugging Face hub is off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)")
    if (reason := _unanswered(hub.endpoint, repo, hub.timeout)) is not None:
        raise DatasetUnavailable(reason)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_ETAG_TIMEOUT": f"{hub.timeout:g}",
            "HF_HUB_DOWNLOAD_TIMEOUT": f"{hub.timeout:g}"}  # fmt: skip
    command = [sys.executable, "-m", "train.data", "download", name, "--root", str(root)]
    print(f"[data] {name}: downloading {repo} from {hub.endpoint} (giving up after {hub.deadline:g} s)", flush=True)
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=hub.deadline)
    except subprocess.TimeoutExpired:
        cache.remove_stale_temp_files(path)  # the killed child's unfinished cache write
        raise DatasetUnavailable(f"downloading {repo} from {hub.endpoint} took over {hub.deadline:g} s") from None
    data = cache.read(path, keys)
    if done.returncode != 0 or data is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DatasetUnavailable(f"downloading {repo} from {hub.endpoint} failed: {last}")
    return data


def download(name: str, root: Path) -> None:
    """Download and convert hub dataset ``name`` into the cache (runs in ``fetch``'s child process)."""
    import datasets

    hub_dataset = HUB_DATASETS[name]
    data = hub_dataset.convert(datasets.load_dataset(hub_dataset.repo))
    cache.write(cache.cache_file(root, name), {**data, "source": f"huggingface:{hub_dataset.repo}"})


# ---------------------------------------------------------------- hub-only sources


def _images(name: str, num_classes: int) -> Callable[..., ImageSplits]:
    def load(root: Path, seed: int, *, val_size: int = 5000, hub: Hub | None = None) -> ImageSplits:
        return official_splits(fetch(name, root, hub), val_size, seed, num_classes)

    load.__doc__ = f"{name}: the official test split; validation carved from train by seed."
    return load


def load_shakespeare(
    root: Path, seed: int, *, hub: Hub | None = None, fractions: tuple[float, float, float] = TEXT_FRACTIONS
) -> TextSplits:
    """Tiny Shakespeare (~1.1M chars) from the hub, else the Austen corpus."""
    try:
        data = fetch("shakespeare", root, hub)
    except DatasetUnavailable as err:
        splits = austen.load(root, seed, fractions=fractions)
        return replace(splits, source=f"{splits.source} (fallback: shakespeare unavailable: {err})")
    return text_splits(data["text"], data["source"], fractions)


CIFAR10 = Source("cifar10", "image", _images("cifar10", 10), "CIFAR-10, 3x32x32, 10 classes; Hugging Face hub")
CIFAR100 = Source("cifar100", "image", _images("cifar100", 100), "CIFAR-100, 3x32x32, 100 classes; Hugging Face hub")
SHAKESPEARE = Source(
    "shakespeare", "text", load_shakespeare, "Tiny Shakespeare, 1.1 M chars; Hugging Face hub, else austen",
    offline="falls back to austen",
)  # fmt: skip
