"""What a dataset module declares about itself: ``Source`` (kind, loader, offline availability, help line,
model defaults) and, optionally, an ``Extrapolation`` (a larger test set of the same task)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from train.data.splits import ImageSplits, TextSplits

Kind = Literal["image", "video", "text"]


@dataclass(frozen=True)
class Extrapolation:
    """A test set of the same task at ``factor`` times the trained scale (e.g. the arrow task on a larger canvas).

    ``test_set(root, seed, options, factor)`` returns the test dataset and the record fields describing it:
    ``{"size": [...], "grid": [...], "rounded": bool, "label": "canvas 72 px, grid 9x9"}``. ``kind`` names the
    records in ``evaluation.json``; ``title`` heads the report section.
    """

    kind: str
    title: str
    test_set: Callable[[Path, int, dict[str, Any], float], tuple[Dataset, dict[str, Any]]]


@dataclass(frozen=True)
class Source:
    """One registered dataset.

    ``load(root, seed, **options)`` returns ``ImageSplits`` (kind ``image`` / ``video``) or ``TextSplits``
    (kind ``text``); same root, seed and options give identical data. ``offline`` says where the data comes
    from without network (empty: only from the Hugging Face hub). ``takes_path`` sources are named
    ``name:PATH``. ``debian_packages`` are what ``python -m train.data install NAME`` installs.
    ``model_defaults(options)`` gives model options implied by the data options (the arrow task: one patch
    per cell). ``preset_options`` are the data options at each training preset's scale (``train.presets``:
    ``smoke``, ``cpu``, ``gpu``, ``paper``), e.g. the arrow task's image size and split sizes; command-line data
    options override them.
    """

    name: str
    kind: Kind
    load: Callable[..., ImageSplits | TextSplits]
    help: str
    offline: str = ""
    takes_path: bool = False
    debian_packages: tuple[str, ...] = ()
    model_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extrapolation: Extrapolation | None = None
    preset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
