"""Build any encoding from a string spec such as ``"liere8"``, ``"rope-mixed"`` or ``"liere64:init=uniform"``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

from liere.absolute import LearnedAbsolute, NoPE, SinCosAbsolute
from liere.comrope import ComRoPE
from liere.encoding import PositionEncoding
from liere.lie import LieRE
from liere.rope import AxialRoPE, RoPE, RoPEMixed
from liere.rope_basis import RoPEBasis
from liere.string_pe import CayleySTRING, CirculantSTRING
from liere.visionllama import VisionLlamaRoPE

Builder = Callable[..., PositionEncoding]
_REGISTRY: dict[str, tuple[re.Pattern[str], Builder]] = {}


def register(pattern: str) -> Callable[[Builder], Builder]:
    """Register a builder for specs matching the regex ``pattern`` (matched whole).

    The builder (a function or an encoding class) gets those of the keyword arguments ``head_dim, num_axes,
    num_heads, depth, dim, grid_shape`` that its signature names, the regex's named groups (as ints when
    numeric) and the spec's options.
    """

    def decorate(builder: Builder) -> Builder:
        _REGISTRY[pattern] = (re.compile(pattern), builder)
        return builder

    return decorate


def available() -> list[str]:
    """The registered spec names, with ``<group>`` for a pattern's named group (e.g. ``liere<block_size>``)."""
    return [re.sub(r"\(\?P<(\w+)>[^)]*\)\??", r"<\1>", pattern) for pattern in _REGISTRY]


def _parse_value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """Split ``"name:key=value,key=value"`` into the name and typed options."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a non-empty string such as 'liere8', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"spec {spec!r}: options must look like key=value, got {item!r}")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip().lower(), options


def build(
    spec: str,
    *,
    head_dim: int,
    num_axes: int = 1,
    num_heads: int = 1,
    depth: int = 1,
    dim: int | None = None,
    grid_shape: Sequence[int] | None = None,
    **options: object,
) -> PositionEncoding:
    """Build the encoding named by ``spec`` (see ``available()``); keyword ``options`` override spec options.

    ``num_heads``/``depth`` count distinct per-head/per-layer parameter sets (learned encodings only);
    ``dim`` (model width) is needed by additive encodings, ``grid_shape`` by the learned absolute table.
    """
    name, spec_options = parse_spec(spec)
    for pattern, builder in _REGISTRY.values():
        match = pattern.fullmatch(name)
        if match is None:
            continue
        common = dict(
            head_dim=head_dim, num_axes=num_axes, num_heads=num_heads, depth=depth, dim=dim, grid_shape=grid_shape
        )
        accepted = inspect.signature(builder).parameters
        kwargs = {k: v for k, v in common.items() if k in accepted}
        kwargs |= {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items() if v is not None}
        kwargs |= spec_options | options
        try:
            return builder(**kwargs)
        except TypeError as err:
            raise TypeError(f"encoding {spec!r}: {err}") from err
    raise ValueError(f"unknown encoding spec {spec!r}; known: {', '.join(available())}")


def _rope(head_dim: int, num_axes: int, **options: object) -> PositionEncoding:
    if num_axes != 1:
        raise ValueError(f"'rope' is 1D but num_axes={num_axes}; use 'axial-rope' or 'rope-mixed' for grids")
    return RoPE(head_dim, **options)


def _abs(dim: int, grid_shape: Sequence[int] | None, num_axes: int, head_dim: int, **options: object):
    if grid_shape is None or len(grid_shape) != num_axes:
        raise ValueError(f"'abs' needs grid_shape with num_axes={num_axes} sizes (the trained grid), got {grid_shape}")
    return LearnedAbsolute(dim, grid_shape, head_dim, **options)


register("none")(NoPE)
register("abs")(_abs)
register("sincos")(SinCosAbsolute)
register("rope")(_rope)
register("axial-rope")(AxialRoPE)
register("rope-mixed")(RoPEMixed)
register(r"liere(?P<block_size>\d+)?")(LieRE)
register("visionllama")(VisionLlamaRoPE)
register("string-cayley")(CayleySTRING)
register("string-circulant")(CirculantSTRING)
register(r"comrope-(?P<variant>ap|ld)(?P<block_size>\d+)?")(ComRoPE)
register("rope-basis")(RoPEBasis)
