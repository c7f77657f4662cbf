"""Atomic, validated training checkpoints: model, optimizer, scheduler, step, RNG states and run config.

A run folder keeps ``last.pt`` and the one before it, ``prev.pt``. A new checkpoint is written to a temp
file in the same folder, fsynced, and only then moved into place (``last.pt -> prev.pt``, temp ->
``last.pt``), so a crash at any moment leaves at least one complete checkpoint and a corrupt file is never
written over a good one. ``load`` checks the format version and the config hash before anything is restored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
LAST, PREV = "last.pt", "prev.pt"
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
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
    }  # fmt: skip


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
    """A checkpoint dict: ``state`` (step, model, optimizer, ...) plus format version, config, hash and RNG states."""
    return dict(format_version=FORMAT_VERSION, config=config, config_hash=config_hash(config), rng=rng_state(),
                model_spec=model_spec, **state)  # fmt: skip


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; an existing ``path`` becomes ``prev.pt`` in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
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
    """The checkpoint to resume from: ``last.pt``, else ``prev.pt`` (a crash between the two renames), else None."""
    for name in (LAST, PREV):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and structurally validate a checkpoint; raise ``CheckpointError`` naming the file otherwise."""
    path = Path(path)
    hint = f" (the previous checkpoint {path.with_name(PREV)} is intact)" if path.name == LAST else ""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt){hint}: {err}") from err
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        missing = [key for key in _REQUIRED if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"checkpoint {path} is not a liere training checkpoint (missing {missing}){hint}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, this code reads {FORMAT_VERSION}"
        )
    if config_hash(state["config"]) != state["config_hash"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its config does not match its stored hash{hint}")
    return state


def check_config(path: str | Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` listing every field where the checkpoint's run config differs from ``config``."""
    if state["config_hash"] == config_hash(config):
        return
    saved = state["config"]
    keys = sorted(saved.keys() | config.keys())
    diffs = [f"{k}: {saved.get(k)!r} in checkpoint vs {config.get(k)!r} now" for k in keys
             if saved.get(k) != config.get(k)]  # fmt: skip
    raise CheckpointError(f"checkpoint {path} belongs to a different run; mismatched config: " + "; ".join(diffs))


def load_state_dict(path: str | Path, module: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with errors (missing keys, shape mismatch) naming the file."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: the {what} state does not fit this run: {err}") from err


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``{"class": "package.module.Class", "kwargs": {...}}`` (stored in every checkpoint)."""
    module_name, _, class_name = spec["class"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec["kwargs"])


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a checkpoint, rebuilt from its stored spec and weights, in eval mode."""
    state = read(path, map_location)
    model = build_model(state["model_spec"])
    load_state_dict(path, model, state["model"], "model")
    return model.eval()
