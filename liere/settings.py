"""An encoding's defining settings, stored with its weights and checked when they are loaded.

``PositionEncoding.get_extra_state`` puts ``settings_tensor(encoding)`` into the state dict (key
``<prefix>_extra_state``): the settings as JSON in a uint8 tensor, so that state dicts stay tensors only
(``safetensors``, ``torch.load(weights_only=True)``, code that maps over the values). ``load_state_dict`` hands it to
``check_settings``, which raises naming every field that differs. Stored are the fields that, with the stored
tensors, decide the encoding's outputs (each class's ``stored_settings``): e.g. ``theta`` of the fixed RoPEs, whose
frequencies are not weights, and ``block_size`` of LieRE. Settings that only choose initial values (``init``, and
``theta`` of learned encodings) or the numerics (``method``, ``recompute``) are not. State dicts saved before settings
were stored hold none: they load as before, unchecked (``forgive_missing_settings``).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

SETTINGS_KEY = "_extra_state"  # torch's key for get_extra_state, after the module's prefix


def settings_of(encoding: nn.Module) -> dict[str, object]:
    """``{field: value}`` of the encoding's ``stored_settings``."""
    return {name: getattr(encoding, name) for name in encoding.stored_settings}


def settings_tensor(encoding: nn.Module) -> Tensor:
    """``settings_of(encoding)`` as JSON bytes in a uint8 tensor."""
    return torch.tensor(list(json.dumps(settings_of(encoding)).encode()), dtype=torch.uint8)


def read_settings(stored: Tensor) -> dict[str, object]:
    """Inverse of ``settings_tensor`` (any dtype holding the byte values; JSON lists read as tuples)."""
    try:
        settings = json.loads(bytes(stored.round().to(torch.uint8).tolist()).decode())
    except (AttributeError, TypeError, RuntimeError, ValueError) as err:
        raise ValueError(f"the stored encoding settings are not readable: {err}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"the stored encoding settings must be a dict, got {settings!r}")
    return {name: tuple(v) if isinstance(v, list) else v for name, v in settings.items()}


def check_settings(encoding: nn.Module, stored: Tensor) -> None:
    """Raise ``ValueError`` naming each field of ``stored`` (a checkpoint's settings) that differs from the encoding's
    own; fields the checkpoint does not hold, or this encoding does not store, are not compared."""
    own, saved = settings_of(encoding), read_settings(stored)
    wrong = [
        f"{name}: checkpoint has {saved[name]!r}, this encoding has {own[name]!r}"
        for name in own
        if name in saved and saved[name] != own[name]
    ]
    if wrong:
        raise ValueError(f"{type(encoding).__name__} settings differ from the checkpoint's: {'; '.join(wrong)}")


def forgive_missing_settings(prefix: str, missing_keys: list[str]) -> None:
    """Drop the encoding's settings key from ``missing_keys``: a state dict saved without settings still loads."""
    key = prefix + SETTINGS_KEY
    if key in missing_keys:
        missing_keys.remove(key)
