"""The dataset registry: one ``Source`` per name (declared in its own module), and the calls that use it.

Adding a dataset: a module in ``train/data/`` that defines a ``Source``, plus its line in ``DATASETS``
(see CONTRIBUTING.md). Nothing outside ``train/data/`` names a dataset.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from train.data import arrow, austen, clips3d, digits, fashion_mnist, folder, hub, text
from train.data.cache import default_root
from train.data.source import Source
from train.data.splits import DatasetUnavailable, ImageSplits, TextSplits, describe

DEFAULT_DATASET = "arrow"
DATASETS: dict[str, Source] = {
    s.name: s
    for s in (
        arrow.SOURCE,
        fashion_mnist.SOURCE,
        hub.CIFAR10,
        hub.CIFAR100,
        digits.SOURCE,
        clips3d.SOURCE,
        folder.SOURCE,
        austen.SOURCE,
        hub.SHAKESPEARE,
        text.PYDOC,
        text.FILE,
    )
}


def source(name: str) -> Source:
    """The registered source of a dataset name (``folder:PATH`` / ``text:PATH`` for sources that take a path)."""
    base, _, path = name.partition(":")
    found = DATASETS.get(base)
    if found is None or bool(path) != found.takes_path:
        valid = [f"{s.name}:PATH" if s.takes_path else s.name for s in DATASETS.values()]
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(valid)}")
    return found


def is_text(name: str) -> bool:
    """Whether ``name`` is a char-level text dataset (else images or clips)."""
    return source(name).kind == "text"


def model_defaults(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Model options implied by the dataset and its data options (e.g. the arrow task's patch = one cell)."""
    defaults = source(name).model_defaults
    return defaults(options) if defaults is not None else {}


def offline_names() -> list[str]:
    """Datasets that load without the Hugging Face hub."""
    return [f"{s.name}:PATH" if s.takes_path else s.name for s in DATASETS.values() if s.offline]


def help_lines() -> str:
    """One line per dataset: name, kind and help (for ``--task`` help texts)."""
    width = max(len(s.name) + 5 * s.takes_path for s in DATASETS.values())
    lines = [
        f"{s.name + (':PATH' if s.takes_path else ''):<{width}}  {s.kind:<5}  {s.help}"
        + (" (default)" if s.name == DEFAULT_DATASET else "")
        for s in DATASETS.values()
    ]
    return "\n".join(lines)


def data_options(name: str) -> set[str] | None:
    """The data options the dataset's loader takes (e.g. ``image_size``, ``fractions``); None if open-ended."""
    parameters = inspect.signature(source(name).load).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters) - {"root", "seed", "path"}


def load_dataset(
    name: str = DEFAULT_DATASET, *, root: str | Path | None = None, seed: int = 0, **options: Any
) -> ImageSplits | TextSplits:
    """Load a dataset by registry name (``DATASETS``; ``folder:PATH`` and ``text:PATH`` take a path).

    ``root``: the data cache (default ``$LIERE_DATA_DIR``, else ``~/.cache/liere``). ``options`` go to the
    source's loader (e.g. ``image_size``, ``num_train``, ``hub``); same name, seed and options give identical
    data. Raises ``DatasetUnavailable`` with one line saying what to do when no source can be reached.
    """
    found, path = source(name), name.partition(":")[2]
    accepted = data_options(name)
    if accepted is not None and (unknown := sorted(set(options) - accepted)):
        raise ValueError(f"dataset {name!r}: unknown data options {unknown}; it takes {sorted(accepted)}")
    if path:
        options["path"] = path
    root = Path(root) if root is not None else default_root()
    try:
        splits = found.load(root, seed, **options)
    except DatasetUnavailable as err:
        fetch = f"`python -m train.data fetch {name}` where the hub answers fills the data cache ({root}); "
        raise DatasetUnavailable(
            f"{name}: {err}. {fetch if name in hub.HUB_DATASETS else ''}"
            f"offline alternatives: {', '.join(offline_names())}"
        ) from None
    print(f"[data] {name}: {describe(splits)}", flush=True)
    return splits


def extrapolation_titles() -> dict[str, str]:
    """Report headings of every registered extrapolation kind (e.g. ``"canvas"``)."""
    return {s.extrapolation.kind: s.extrapolation.title for s in DATASETS.values() if s.extrapolation}


def extrapolation_set(
    name: str, options: dict[str, Any], factor: float, seed: int = 0, root: str | Path | None = None
) -> tuple[Dataset, dict[str, Any]] | None:
    """The dataset's own extrapolation test set at ``factor`` (None if it has none) and its record fields
    (``kind``, ``size``, ``grid``, ``rounded``)."""
    extrapolation = source(name).extrapolation
    if extrapolation is None:
        return None
    root = Path(root) if root is not None else default_root()
    test, info = extrapolation.test_set(root, seed, options, factor)
    label = info.pop("label")
    print(f"[data] {name} {label} (extrapolation test set, factor {factor:g}): {len(test)} images", flush=True)
    return test, {"kind": extrapolation.kind, **info}


def preset_options(name: str, preset: str) -> dict[str, Any]:
    """The dataset's data options at ``preset``'s scale (``Source.preset_options``; empty if it sets none)."""
    return dict(source(name).preset_options.get(preset, {}))
