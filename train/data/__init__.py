"""Datasets for the A/B runs behind one call: ``load_dataset(name, root=..., seed=..., **options)``.

Vision datasets give ``ImageSplits`` (items: float image in [0, 1] of shape (C, H, W), or (C, T, H, W)
for clips, and an int label); text datasets give ``TextSplits`` (1-D int64 char ids). Every result
carries ``source``, saying where it came from, printed once per load. Each dataset is one module here
declaring a ``Source``, listed in ``registry.DATASETS``. The Hugging Face hub is tried with a bounded wait
(``hub``); offline sources are generated in code, read from Debian packages or taken from the standard
library. Generated and converted tensors are cached (``cache``): ``$LIERE_DATA_DIR``, else ``~/.cache/liere``.
Loaders install nothing and change no environment variable: ``python -m train.data install NAME`` installs
a dataset's Debian package on request.
"""

from train.data.cache import default_root
from train.data.hub import Hub
from train.data.registry import (
    DATASETS,
    DEFAULT_DATASET,
    data_options,
    extrapolation_set,
    extrapolation_titles,
    help_lines,
    is_text,
    load_dataset,
    model_defaults,
    preset_options,
    source,
)
from train.data.source import Extrapolation, Source
from train.data.splits import (
    DatasetUnavailable,
    ImageSplits,
    TensorImageDataset,
    TextSplits,
    char_batches,
    describe,
    size_unit,
    split_sizes,
    text_splits,
)

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetUnavailable",
    "Extrapolation",
    "Hub",
    "ImageSplits",
    "Source",
    "TensorImageDataset",
    "TextSplits",
    "char_batches",
    "data_options",
    "default_root",
    "describe",
    "extrapolation_set",
    "extrapolation_titles",
    "help_lines",
    "is_text",
    "load_dataset",
    "model_defaults",
    "preset_options",
    "size_unit",
    "split_sizes",
    "source",
    "text_splits",
]
