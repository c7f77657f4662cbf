"""The data cache: generated and converted tensors, one ``.pt`` file per dataset and option set.

The cache lives in ``$LIERE_DATA_DIR``, else ``~/.cache/liere`` (shared by every checkout of the project),
or wherever a loader's ``root`` says. Files are written atomically (temp file + rename); an unreadable
file (truncated, corrupt, foreign) is reported by path, deleted and rebuilt.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train.data.splits import ImageSplits, TensorImageDataset

CACHE_VERSION = 1  # bump when a generator or a conversion changes, to invalidate caches
ENV_VAR = "LIERE_DATA_DIR"


def default_root() -> Path:
    """``$LIERE_DATA_DIR`` if set, else ``~/.cache/liere``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "liere")


def cache_file(root: Path, name: str, **key: Any) -> Path:
    """``root/name_v1_k=v_....pt``: one file per combination of options."""
    parts = [name, f"v{CACHE_VERSION}", *(f"{k}={v}" for k, v in sorted(key.items()))]
    return Path(root) / ("_".join(parts).replace("/", "-").replace(" ", "") + ".pt")


def read(path: Path) -> dict[str, Any] | None:
    """The cached dict at ``path``; None if absent, or if unreadable (then it is deleted, saying so on stderr)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict):
            raise ValueError(f"holds a {type(data).__name__}, not a dict")
        return data
    except Exception as err:  # any unpickling or archive error means the file is not a cache we wrote
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"[data] cache file {path} is unreadable ({type(err).__name__}: {reason[:200]}); rebuilding it",
              file=sys.stderr, flush=True)  # fmt: skip
        path.unlink(missing_ok=True)
        return None


def write(path: Path, data: dict[str, Any]) -> None:
    """Save ``data`` to ``path`` atomically (a killed write leaves the old file or none, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cached(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The dict cached at ``path``, else ``build()``, saved there first."""
    data = read(path)
    if data is None:
        data = build()
        write(path, data)
    return data


SPLITS = ("train", "val", "test")


def generated(
    name: str, generate: Callable[..., dict], root: Path, seed: int, counts: dict[str, int], **opts: Any
) -> tuple[dict[str, Any], str]:
    """Splits from a seeded generator, cached by every option: ``({split: tensor dict}, source)``.

    ``counts`` maps split names (of ``SPLITS``) to sizes; split ``SPLITS[i]`` is drawn with seed ``(seed, i)``,
    so a test split generated alone equals the one generated with its train and val splits.
    """
    described = ",".join(f"{k}={v}" for k, v in {"seed": seed, **opts}.items())

    def build() -> dict[str, Any]:
        splits = {
            split: {k: torch.from_numpy(v) for k, v in generate(n, **opts, seed=(seed, SPLITS.index(split))).items()}
            for split, n in counts.items()
        }
        return {**splits, "source": f"generated:{name}({described})"}

    parts = counts.values() if tuple(counts) == SPLITS else (f"{s}{n}" for s, n in counts.items())
    data = cached(cache_file(root, name, seed=seed, **opts, n="-".join(map(str, parts))), build)
    return {split: data[split] for split in counts}, data["source"]


def generated_splits(
    name: str, generate: Callable[..., dict], num_classes: int, root: Path, seed: int, sizes: tuple[int, int, int],
    **opts: Any,
) -> ImageSplits:  # fmt: skip
    """``ImageSplits`` of train/val/test ``sizes`` from ``generated`` (image shape read from the data)."""
    data, source = generated(name, generate, root, seed, dict(zip(SPLITS, sizes, strict=True)), **opts)
    train, val, test = (TensorImageDataset.from_dict(data[s]) for s in SPLITS)
    return ImageSplits(train, val, test, num_classes, tuple(train.images.shape[1:]), source)
