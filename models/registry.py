"""The models a stored spec may rebuild: an allow-list of names, with keyword arguments checked before any call.

A model spec is plain data, ``{"model": "vit", "kwargs": {...}}``: the name picks a class from ``MODELS`` (never
an import path), and the keyword arguments must be names of that class's constructor holding plain JSON values
(str, int, float, bool, None, and lists, tuples and str-keyed dicts of them). Specs written before the registry
(``{"class": "models.vit.ViT", ...}``) are read through the fixed map ``LEGACY_CLASSES``. Anything else raises
``ModelSpecError`` naming the refused name, before anything is imported or called.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from models.lm import CharLM
from models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {"vit": ViT, "charlm": CharLM}
LEGACY_CLASSES = {"models.vit.ViT": "vit", "models.lm.CharLM": "charlm"}  # the "class" paths of older checkpoints


class ModelSpecError(ValueError):
    """A model spec that names no registered model, or whose arguments do not fit it."""


def model_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """The stored form of a model: ``{"model": name, "kwargs": kwargs}`` (checked like a spec read back)."""
    spec = {"model": name, "kwargs": kwargs}
    check_spec(spec)
    return spec


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain JSON-like data (no objects that could run code when used)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def check_spec(spec: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    """The registered class and the keyword arguments of ``spec``; ``ModelSpecError`` saying what is refused.

    Only data is looked at: nothing is imported, constructed or called.
    """
    if not isinstance(spec, Mapping):
        raise ModelSpecError(f"a model spec must be a dict {{'model': ..., 'kwargs': ...}}, got {type(spec).__name__}")
    if "model" in spec:
        name = spec["model"]
    elif "class" in spec:
        if spec["class"] not in LEGACY_CLASSES:
            raise ModelSpecError(
                f"refused model class {spec['class']!r}: only {sorted(LEGACY_CLASSES)} are rebuilt from a class path"
            )
        name = LEGACY_CLASSES[spec["class"]]
    else:
        raise ModelSpecError(f"a model spec needs 'model' (one of {sorted(MODELS)}), got keys {sorted(map(str, spec))}")
    if not isinstance(name, str) or name not in MODELS:
        raise ModelSpecError(f"refused model {name!r}: registered models are {sorted(MODELS)}")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelSpecError(f"model {name!r}: kwargs must be a dict with str keys, got {kwargs!r:.200}")
    parameters = dict(inspect.signature(MODELS[name]).parameters)
    if unknown := sorted(set(kwargs) - set(parameters)):
        raise ModelSpecError(f"model {name!r}: refused unknown arguments {unknown}; it takes {sorted(parameters)}")
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty]
    if missing := [n for n in required if n not in kwargs]:
        raise ModelSpecError(f"model {name!r}: missing arguments {missing}")
    if bad := sorted(k for k, v in kwargs.items() if not _plain(v)):
        raise ModelSpecError(
            f"model {name!r}: refused arguments {bad}: values must be plain data (str, int, float, bool, None, lists "
            "and dicts of them)"
        )
    return MODELS[name], dict(kwargs)


def build_model(spec: Any) -> nn.Module:
    """A freshly initialised model from a checked spec (see ``check_spec``; draws from the global torch RNG)."""
    cls, kwargs = check_spec(spec)
    return cls(**kwargs)
