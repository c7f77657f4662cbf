"""The data cache: generated and converted tensors, one ``.pt`` file per dataset and option set.

The cache lives in ``$LIERE_DATA_DIR``, else ``~/.cache/liere`` (shared by every checkout of the project),
or wherever a loader's ``root`` says. Files are written atomically (temp file + rename) with a SHA-256 of
their content; a file that is unreadable, does not verify, or lacks the entries its loader needs (truncated,
corrupt, foreign, a folder in its place) is reported by path, removed and rebuilt. Temp files left by killed
writes on this machine are removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from train import torch_files
from train.data.splits import ImageSplits, TensorImageDataset
from train.hashing import checksum
from train.run_dir import alive, writing

CACHE_VERSION = 1  # bump when a generator or a conversion changes, to invalidate caches
ENV_VAR = "LIERE_DATA_DIR"


def default_root() -> Path:
    """``$LIERE_DATA_DIR`` if set, else ``~/.cache/liere``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "liere")


def cache_file(root: Path, name: str, **key: Any) -> Path:
    """``root/name_v1_k=v_....pt``: one file per combination of options."""
    parts = [name, f"v{CACHE_VERSION}", *(f"{k}={v}" for k, v in sorted(key.items()))]
    return Path(root) / ("_".join(parts).replace("/", "-").replace(" ", "") + ".pt")


def _note(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr, flush=True)


def temp_file(path: Path) -> Path:
    """The temp file a write of ``path`` goes through: ``.<name>.<host>.<pid>.tmp`` in the same folder."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove the temp files of ``path`` whose writing process (on this machine) is gone; returns them."""
    stale = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        host, _, pid = tmp.name[len(path.name) + 2 : -len(".tmp")].rpartition(".")
        if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)
            stale.append(tmp)
    if stale:
        _note(f"removed {len(stale)} temp file(s) of {path} left by killed writes")
    return stale


def _problem(data: Any, keys: Sequence[str]) -> str | None:
    """Why a loaded cache ``data`` cannot be used (None: it can)."""
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not a dict"
    if missing := [k for k in keys if k not in data]:
        return f"lacks {missing}"
    if "checksum" in data and data["checksum"] != checksum(data):
        return "does not match its checksum (corrupt)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read(path: Path, keys: Sequence[str] = ()) -> dict[str, Any] | None:
    """The cached dict at ``path`` (without its checksum); None if absent, or if unusable: unreadable, not
    verifying, or lacking one of ``keys`` (then it is removed, saying so on stderr). A file from before
    checksums is given one."""
    remove_stale_temp_files(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = torch_files.load(path)
        problem = _problem(data, keys)
    except Exception as err:  # any unpickling or archive error means the file is not a cache we wrote
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        problem = f"is unreadable ({type(err).__name__}: {reason[:200]})"
    if problem is not None:
        _note(f"cache file {path} {problem}; rebuilding it")
        _remove(path)
        return None
    if "checksum" not in data:
        _note(f"cache file {path} has no checksum (written by an older version); adding one")
        try:
            write(path, data)
        except OSError as err:  # a read-only shared cache stays usable
            _note(f"{err}; using the file as it is")
    return {k: v for k, v in data.items() if k != "checksum"}


def write(path: Path, data: dict[str, Any]) -> None:
    """Save ``data`` and its checksum to ``path`` atomically (a killed write leaves the old file or none, never
    half a file); ``WriteFailed`` naming the file when the disk is full."""
    tmp = temp_file(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data | {"checksum": checksum(data)}, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached(path: Path, build: Callable[[], dict[str, Any]], keys: Sequence[str] = ()) -> dict[str, Any]:
    """The dict cached at ``path`` (with at least ``keys``), else ``build()``, saved there first."""
    data = read(path, keys)
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
    path = cache_file(root, name, seed=seed, **opts, n="-".join(map(str, parts)))
    data = cached(path, build, keys=(*counts, "source"))
    return {split: data[split] for split in counts}, data["source"]


def generated_splits(
    name: str, generate: Callable[..., dict], num_classes: int, root: Path, seed: int, sizes: tuple[int, int, int],
    **opts: Any,
) -> ImageSplits:  # fmt: skip
    """``ImageSplits`` of train/val/test ``sizes`` from ``generated`` (image shape read from the data)."""
    data, source = generated(name, generate, root, seed, dict(zip(SPLITS, sizes, strict=True)), **opts)
    train, val, test = (TensorImageDataset.from_dict(data[s]) for s in SPLITS)
    return ImageSplits(train, val, test, num_classes, tuple(train.images.shape[1:]), source)
