"""Atomic, validated training checkpoints: model, optimizer, scheduler, step, RNG states and run config.

A run folder keeps ``last.pt`` and the one before it, ``prev.pt``. A new checkpoint is written to a temp
file in the same folder, fsynced, and only then moved into place (``last.pt -> prev.pt``, temp ->
``last.pt``), so a crash at any moment leaves at least one complete checkpoint and a corrupt file is never
written over a good one. Every checkpoint stores a SHA-256 checksum of its whole state; ``read`` checks the
format version, the config hash and the checksum before anything is restored, and ``find_valid`` falls back
from a corrupt ``last.pt`` to a verified ``prev.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.registry import ModelSpecError, build_model, check_spec
from train import torch_files
from train.hashing import checksum
from train.run_dir import LAST, PREV, tmp_path, warn, writing

FORMAT_VERSION = 2  # 2 adds "checksum"; version 1 checkpoints (no checksum) still load
READABLE_VERSIONS = (1, 2)
_REQUIRED = (
    "format_version",
    "config",
    "config_hash",
    "step",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "model_spec",
    "timing",
    "loss",
    "val",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, from another format version, or from another run."""


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable config dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), python ``random`` and numpy."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by ``rng_state`` (CUDA states only when the same devices are present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))


def bundle(config: dict[str, Any], model_spec: dict[str, Any], **state: Any) -> dict[str, Any]:
    """A checkpoint dict: ``state`` (step, model, optimizer, ...) plus format version, config, hash, RNG states and
    the checksum of it all."""
    full = dict(
        format_version=FORMAT_VERSION,
        config=config,
        config_hash=config_hash(config),
        rng=rng_state(),
        model_spec=model_spec,
        **state,
    )
    return full | {"checksum": checksum(full)}


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; an existing ``path`` becomes ``prev.pt`` in the same folder.
    ``WriteFailed`` (naming ``path`` and the cause, e.g. no space left) when it cannot, leaving ``path`` as it was."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.replace(path, path.with_name(PREV))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def find(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file present: ``last.pt``, else ``prev.pt`` (a crash between the renames), else None.

    Presence only; ``find_valid`` also reads and verifies.
    """
    for name in (LAST, PREV):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint (structure, format, config hash, checksum); ``CheckpointError`` naming the
    file otherwise."""
    path = Path(path)
    try:
        state = torch_files.load(path, map_location=map_location)
    except torch_files.OversizedTensor as err:
        raise CheckpointError(f"checkpoint {err}") from err
    except Exception as err:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {err}") from err
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        missing = [key for key in _REQUIRED if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"checkpoint {path} is not a liere training checkpoint (missing {missing})")
    if state["format_version"] not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, this code reads {READABLE_VERSIONS}"
        )
    if config_hash(state["config"]) != state["config_hash"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its config does not match its stored hash")
    if state["format_version"] >= 2 and state.get("checksum") != checksum(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match its stored checksum")
    check_model_spec(path, state)
    return state


def check_model_spec(path: str | Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model spec is not on the allow-list of ``models.registry`` (nothing is built)."""
    try:
        check_spec(state.get("model_spec"))
    except ModelSpecError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def find_valid(
    run_dir: str | Path,
    map_location: str | torch.device = "cpu",
    names: Iterable[str] = (LAST, PREV),
    reader: Callable[[Path], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``run_dir`` that reads and verifies, with its state; None if there is none.

    A corrupt ``last.pt`` is renamed ``last.pt.corrupt`` (kept for inspection, never rotated over ``prev.pt``)
    and the run falls back to ``prev.pt`` with a warning on stderr. If every present checkpoint is bad, raises
    ``CheckpointError`` describing each. ``reader`` (default ``read``) reads and verifies one checkpoint (file or
    folder: ``train.dcp_checkpoint.read``).
    """
    run_dir, errors = Path(run_dir), []
    for name in names:
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = read(path, map_location) if reader is None else reader(path)
        except CheckpointError as err:
            errors.append((path, err))
            continue
        for bad, err in errors:
            kept = bad.with_name(bad.name + ".corrupt")
            if kept.is_dir():
                shutil.rmtree(kept)
            os.replace(bad, kept)
            warn(f"{err}; moved it to {kept.name}, resuming from {path} (step {state['step']})")
        return path, state
    if errors:
        detail = "; ".join(str(err) for _, err in errors)
        others = " and ".join(p.name for p, _ in errors)
        raise CheckpointError(f"no usable checkpoint in {run_dir} ({others} checked): {detail}")
    return None


def check_config(path: str | Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` listing every field where the checkpoint's run config differs from ``config``."""
    if state["config_hash"] == config_hash(config):
        return
    saved = state["config"]
    keys = sorted(saved.keys() | config.keys())
    diffs = [
        f"{k}: {saved.get(k)!r} in checkpoint vs {config.get(k)!r} now" for k in keys if saved.get(k) != config.get(k)
    ]
    raise CheckpointError(f"checkpoint {path} belongs to a different run; mismatched config: " + "; ".join(diffs))


def load_state_dict(path: str | Path, module: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with errors (missing keys, shape mismatch) naming the file."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: the {what} state does not fit this run: {err}") from err


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a checkpoint file, rebuilt from its stored spec (checked against the allow-list of
    ``models.registry``) and weights, in eval mode (``train.run_checkpoint.load_model`` also reads DCP folders)."""
    state = read(path, map_location)
    model = build_model(state["model_spec"])
    load_state_dict(path, model, state["model"], "model")
    return model.eval()
