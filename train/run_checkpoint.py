"""A run folder's checkpoint, single-file (``last.pt``) or sharded (``--fsdp``: ``last.dcp/``), and its model.

The A/B tools (evaluate, inspect, the runner) read runs of either kind through these three functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import checkpoint, dcp_checkpoint
from train import run_dir as layout

NAMES = (layout.LAST, layout.PREV, layout.LAST_DCP, layout.PREV_DCP)  # newest first, per kind


def find(run_dir: str | Path) -> Path | None:
    """The newest checkpoint present in ``run_dir`` (presence only; ``read`` verifies), or None."""
    return next((Path(run_dir) / name for name in NAMES if (Path(run_dir) / name).exists()), None)


def read(path: str | Path) -> dict[str, Any]:
    """The verified state of a checkpoint file or DCP folder (``train_state`` for a folder)."""
    return dcp_checkpoint.read(Path(path)) if Path(path).is_dir() else checkpoint.read(path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a checkpoint file or DCP folder, rebuilt from its allow-listed spec, in eval mode."""
    if Path(path).is_dir():
        return dcp_checkpoint.load_model(Path(path)).to(map_location)
    return checkpoint.load_model(path, map_location)
