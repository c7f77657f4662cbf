"""Context extension of rotary frequencies in Hugging Face's ``rope_parameters`` format.

``scaled_frequencies`` gives the frequencies and attention factor of a fixed RoPE for ``rope_type`` ``default``,
``linear`` (position interpolation), ``dynamic`` (dynamic NTK), ``yarn`` (Peng et al. 2023, arXiv 2309.00071),
``longrope`` (Ding et al. 2024) and ``llama3``, equal to transformers' ``ROPE_INIT_FUNCTIONS`` to fp32 rounding.
``rescale_frequencies`` applies the same rule to any frequencies (e.g. the spectrum of a learned generator): each
frequency is moved by the rule for its wavelength, which for ``theta ** (-2j / d)`` is the rule for index ``j``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

COMMON_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor")
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
ROPE_TYPES = tuple(TYPE_KEYS)
DEFAULT_THETA = 10000.0


def check_rope_parameters(rope_parameters: Mapping[str, Any]) -> str:
    """The ``rope_type`` of ``rope_parameters`` after checking it is known and every key is one that type uses."""
    if not isinstance(rope_parameters, Mapping):
        raise TypeError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in TYPE_KEYS:
        raise ValueError(f"rope_parameters: unknown rope_type {rope_type!r}; known: {', '.join(ROPE_TYPES)}")
    allowed = COMMON_KEYS + TYPE_KEYS[rope_type]
    if unknown := sorted(set(rope_parameters) - set(allowed)):
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} does not use {unknown}; it takes {list(allowed)}")
    for key in ("factor", "rope_theta", "partial_rotary_factor", "low_freq_factor", "high_freq_factor"):
        value = rope_parameters.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"rope_parameters: {key} must be a number > 0, got {value!r}")
    if rope_type in ("linear", "llama3") and rope_parameters.get("factor") is None:
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} needs factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if rope_parameters.get(key) is None:
                raise ValueError(f"rope_parameters: rope_type 'llama3' needs {key}")
        if not rope_parameters["high_freq_factor"] > rope_parameters["low_freq_factor"]:
            raise ValueError("rope_parameters: high_freq_factor must be > low_freq_factor")
    return rope_type


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _original_length(rope_parameters: Mapping[str, Any], rope_type: str, fallback: int | None = None) -> int:
    value = rope_parameters.get("original_max_position_embeddings", fallback)
    if value is None:
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} needs original_max_position_embeddings")
    return _positive_int(value, "rope_parameters: original_max_position_embeddings")


def _factor(rope_parameters: Mapping[str, Any], original: int, max_position_embeddings: int | None) -> float:
    """``factor``, or ``max_position_embeddings / original`` when it is absent (transformers' fallback)."""
    factor = rope_parameters.get("factor")
    if factor is not None:
        return float(factor)
    if max_position_embeddings is None:
        raise ValueError("rope_parameters: factor is missing and max_position_embeddings is not given")
    return max_position_embeddings / original


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 mscale ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_width(rot_dim: int, rope_parameters: Mapping[str, Any]) -> int:
    """The rotated width ``int(rot_dim * partial_rotary_factor)``."""
    return int(_positive_int(rot_dim, "rot_dim") * rope_parameters.get("partial_rotary_factor", 1.0))


def rescale_frequencies(
    freqs: Tensor,
    rope_parameters: Mapping[str, Any],
    *,
    dim: int,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """``(scaled frequencies, attention factor)`` for frequencies ``freqs`` ``(..., pairs)`` of a rotation of
    width ``dim`` (the ``d`` of the RoPE base ``theta ** (-2j / d)`` they are measured against).

    Each frequency ``w`` gets its type's rule through its wavelength: ``w`` sits at index
    ``j(w) = d ln(1 / w) / (2 ln theta)``. ``linear`` divides by ``factor``; ``dynamic`` moves the base from
    ``theta`` to ``theta * s`` (``w -> w ** (1 + ln s / ln theta)``); ``yarn`` blends ``w`` and ``w / factor``
    with a ramp over ``j(w)`` between YaRN's correction dims; ``llama3`` by wavelength against the original
    length; ``longrope`` divides the ``k``-th largest frequency (last axis) by the ``k``-th factor. Computed in
    fp64, returned in ``freqs``' dtype.
    """
    rope_type = check_rope_parameters(rope_parameters)
    theta = float(rope_parameters.get("rope_theta", DEFAULT_THETA))
    w = freqs.double()
    attention = 1.0
    if rope_type == "linear":
        w = w / rope_parameters["factor"]
    elif rope_type == "dynamic":
        if max_position_embeddings is None:
            max_position_embeddings = _original_length(rope_parameters, rope_type)
        _positive_int(max_position_embeddings, "max_position_embeddings")
        factor = rope_parameters.get("factor")
        if factor is None:
            raise ValueError("rope_parameters: rope_type 'dynamic' needs factor")
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        if dim <= 2:
            raise ValueError(f"rope_parameters: rope_type 'dynamic' needs a rotated width > 2, got {dim}")
        base_scale = (factor * length / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
        w = w ** (1.0 + math.log(base_scale) / math.log(theta))
    elif rope_type == "yarn":
        original = _original_length(rope_parameters, rope_type)
        factor = _factor(rope_parameters, original, max_position_embeddings)
        attention = rope_parameters.get("attention_factor")
        if attention is None:
            mscale, mscale_all = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
            if mscale and mscale_all:
                attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            else:
                attention = yarn_mscale(factor)
        beta_fast = rope_parameters.get("beta_fast") or 32
        beta_slow = rope_parameters.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope_parameters.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        index = dim * torch.log(1.0 / w) / (2 * math.log(theta))
        interpolate = ((index - low) / (high - low)).clamp(0, 1)  # 0: keep w, 1: w / factor
        w = w / factor * interpolate + w * (1 - interpolate)
    elif rope_type == "longrope":
        original = _original_length(rope_parameters, rope_type)
        factor = _factor(rope_parameters, original, max_position_embeddings)
        attention = rope_parameters.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        key = "long_factor" if seq_len and seq_len > original else "short_factor"
        for name in ("short_factor", "long_factor"):
            ext = rope_parameters.get(name)
            if ext is None or len(ext) != w.shape[-1]:
                got = "missing" if ext is None else f"length {len(ext)}"
                raise ValueError(f"rope_parameters: {name} must list {w.shape[-1]} factors (one a pair), got {got}")
        ext = torch.tensor(rope_parameters[key], dtype=torch.float64)
        order = w.argsort(dim=-1, descending=True)  # k-th largest frequency gets the k-th factor
        w = w / ext[order.argsort(dim=-1)]
    elif rope_type == "llama3":
        original = _original_length(rope_parameters, rope_type)
        factor = float(rope_parameters["factor"])
        low_f, high_f = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
        wavelength = 2 * math.pi / w
        smooth = ((original / wavelength - low_f) / (high_f - low_f)).clamp(0, 1)  # 0: w / factor, 1: keep w
        w = (1 - smooth) * w / factor + smooth * w
    return w.to(freqs.dtype), float(attention)


def scaled_frequencies(
    rot_dim: int,
    rope_parameters: Mapping[str, Any],
    *,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """``(frequencies, attention_factor)`` of RoPE over ``int(rot_dim * partial_rotary_factor)`` features: fp32
    frequencies ``(width // 2,)`` for ``rope_parameters`` in Hugging Face's format (``rope_type`` one of
    ``ROPE_TYPES`` with its keys), equal to transformers' ``ROPE_INIT_FUNCTIONS`` to fp32 rounding.

    ``max_position_embeddings`` is the config's (``dynamic``'s reference length, the ``factor`` fallback of
    ``yarn`` and ``longrope``); ``seq_len`` the length in use (``dynamic``, ``longrope``). Rotating q and k
    by these frequencies and multiplying each by ``attention_factor`` is what transformers computes.
    """
    check_rope_parameters(rope_parameters)
    dim = rotary_width(rot_dim, rope_parameters)
    theta = float(rope_parameters.get("rope_theta", DEFAULT_THETA))
    base = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs, attention = rescale_frequencies(
        base, rope_parameters, dim=dim, max_position_embeddings=max_position_embeddings, seq_len=seq_len
    )
    return freqs.float(), attention
