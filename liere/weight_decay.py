"""Model-level parameter names for weight-decay groups."""

from __future__ import annotations

from torch import nn

from liere.encoding import PositionEncoding


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Fully qualified names (as in ``model.named_parameters()``) of the parameters of every position encoding
    inside ``model``: the model-level names timm's ``no_weight_decay()`` and optimizer factories expect.

    An encoding's own ``no_weight_decay()`` names are relative to the encoding (``"generators"``); this helper
    prefixes them with the encoding's path in the model (``"encoding.generators"``, ``"blocks.0.pe.freqs"``).
    """
    return {
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        if isinstance(module, PositionEncoding)
        for name in module.no_weight_decay()
    }
