"""Build any encoding from a string spec such as ``"liere8"``, ``"rope-mixed"`` or ``"liere64:init=uniform"``."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from liere.absolute import LearnedAbsolute, NoPE, SinCosAbsolute
from liere.comrope import ComRoPE
from liere.encoding import PositionEncoding
from liere.lie import LieRE
from liere.rope import AxialRoPE, RoPE, RoPEMixed
from liere.rope_basis import RoPEBasis
from liere.string_pe import CayleySTRING, CirculantSTRING
from liere.visionllama import VisionLlamaRoPE

Builder = Callable[..., PositionEncoding]


@dataclass(frozen=True)
class EncodingInfo:
    """What the registry knows about an encoding: its spec ``name`` (``<group>`` for a pattern's named group),
    an ``example`` spec that builds, the numbers of coordinate ``axes`` it supports, whether it has ``learned``
    parameters, a one-line ``help``, and the specs it contributes to the default comparison (``compare``, see
    ``default_comparison``)."""

    name: str
    pattern: re.Pattern[str]
    builder: Builder
    example: str
    axes: tuple[int, ...]
    learned: bool
    help: str
    compare: tuple[str, ...] = ()


_REGISTRY: dict[str, EncodingInfo] = {}


def register(
    pattern: str,
    *,
    example: str | None = None,
    axes: Sequence[int] = (1, 2, 3),
    learned: bool = False,
    help: str = "",
    compare: Sequence[str] = (),
) -> Callable[[Builder], Builder]:
    """Register a builder for specs matching the regex ``pattern`` (matched whole), with its metadata.

    The builder (a function or an encoding class) gets those of the keyword arguments ``head_dim, num_axes,
    num_heads, depth, dim, grid_shape`` that its signature names, the regex's named groups (as ints when
    numeric) and the spec's options. ``example`` (default: ``pattern`` itself) must be a spec the pattern
    matches; the contract tests (``tests/test_contract.py``) build it for every entry of ``axes``. ``compare``
    lists the specs of this entry that default comparisons include (``default_comparison``); each must match.
    """
    name = re.sub(r"\(\?P<(\w+)>[^)]*\)\??", r"<\1>", pattern)
    example = pattern if example is None else example
    compiled = re.compile(pattern)
    if compiled.fullmatch(example) is None:
        raise ValueError(f"register: example {example!r} does not match the pattern {pattern!r}")
    if unmatched := [spec for spec in compare if compiled.fullmatch(parse_spec(spec)[0]) is None]:
        raise ValueError(f"register: compare specs {unmatched} do not match the pattern {pattern!r}")
    if not axes or not all(isinstance(a, int) and a >= 1 for a in axes):
        raise ValueError(f"register: axes must be positive ints, got {axes!r}")

    def decorate(builder: Builder) -> Builder:
        _REGISTRY[name] = EncodingInfo(name, compiled, builder, example, tuple(axes), learned, help, tuple(compare))
        return builder

    return decorate


def available() -> list[str]:
    """The registered spec names, with ``<group>`` for a pattern's named group (e.g. ``liere<block_size>``)."""
    return list(_REGISTRY)


def encoding_info(name: str) -> EncodingInfo:
    """The registry entry of ``name`` (one of ``available()``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(available())}")
    return _REGISTRY[name]


def default_comparison(num_axes: int) -> list[str]:
    """The default comparison for ``num_axes`` coordinate axes, in registry order: the ``compare`` specs of every
    entry supporting ``num_axes`` (the LieRE paper's line-up: no encoding, learned absolute, the fixed RoPE of
    that many axes, RoPE-Mixed, LieRE-8 and LieRE-64). ``train.ab`` and the benchmarks default to it."""
    return [spec for info in _REGISTRY.values() if num_axes in info.axes for spec in info.compare]


def split_specs(text: str) -> list[str]:
    """Split a list of specs on the commas (or semicolons) that begin a new spec: a comma-separated item holding
    ``=`` before any ``:`` is an option of the spec before it, so ``"axial-rope,liere8:init=uniform,rot_dim=16"``
    -> ``["axial-rope", "liere8:init=uniform,rot_dim=16"]``; ``"a;b:x=1,y=2"`` splits only on the ``;``."""
    if ";" in text:
        return [spec.strip() for spec in text.split(";") if spec.strip()]
    specs: list[str] = []
    for item in filter(None, (item.strip() for item in text.split(","))):
        if "=" not in item.partition(":")[0]:
            specs.append(item)
        elif specs:
            specs[-1] += f",{item}"
        else:
            raise ValueError(f"spec list {text!r}: {item!r} is an option (key=value) but no spec precedes it")
    return specs


def _parse_value(text: str) -> object:
    if text.lower() == "none":
        return None
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
        if key.strip() in options:
            raise ValueError(f"spec {spec!r}: option {key.strip()!r} is given twice")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip().lower(), options


def _option_types(builder: Builder) -> dict[str, object]:
    """Annotated parameter types of ``builder`` (a function or class), following ``forwards_to`` for ``**options``."""
    target = builder.__init__ if isinstance(builder, type) else builder
    hints = typing.get_type_hints(target)
    forwarded = getattr(builder, "forwards_to", None)
    return (_option_types(forwarded) | hints) if forwarded is not None else hints


def _accepts(value: object, annotation: object) -> bool:
    """Whether ``value`` has the type ``annotation`` (plain types and unions of them; an int passes for a float)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # a generic annotation (e.g. Sequence[int]): left to the builder


def _check_options(spec: str, builder: Builder, options: dict[str, object]) -> None:
    """Refuse an option whose value does not have the builder's annotated type (one line naming it)."""
    hints = _option_types(builder)
    for key, value in options.items():
        if key in hints and not _accepts(value, hints[key]):
            expected = getattr(hints[key], "__name__", None) or str(hints[key])
            raise TypeError(f"encoding {spec!r}: option {key}={value!r} must be of type {expected}")


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
    for info in _REGISTRY.values():
        builder, match = info.builder, info.pattern.fullmatch(name)
        if match is None:
            continue
        common = dict(
            head_dim=head_dim, num_axes=num_axes, num_heads=num_heads, depth=depth, dim=dim, grid_shape=grid_shape
        )
        accepted = inspect.signature(builder).parameters
        kwargs = {k: v for k, v in common.items() if k in accepted}
        named = {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items() if v is not None}
        if clash := sorted(set(named) & set(spec_options)):
            key = clash[0]
            raise ValueError(
                f"encoding {spec!r}: option {key}={spec_options[key]!r} conflicts with {key}={named[key]!r} "
                f"given by the name {name!r}; give it once"
            )
        kwargs |= named | spec_options | options
        _check_options(spec, builder, spec_options | options)
        try:
            return builder(**kwargs)
        except TypeError as err:
            raise TypeError(f"encoding {spec!r}: {err}") from err
    raise ValueError(f"unknown encoding spec {spec!r}; known: {', '.join(available())}")


def _rope(head_dim: int, num_axes: int, **options: object) -> PositionEncoding:
    if num_axes != 1:
        raise ValueError(f"'rope' is 1D but num_axes={num_axes}; use 'axial-rope' or 'rope-mixed' for grids")
    return RoPE(head_dim, **options)


_rope.forwards_to = RoPE  # type: ignore[attr-defined]


def _abs(dim: int, grid_shape: Sequence[int] | None, num_axes: int, head_dim: int, **options: object):
    if grid_shape is None or len(grid_shape) != num_axes:
        raise ValueError(f"'abs' needs grid_shape with num_axes={num_axes} sizes (the trained grid), got {grid_shape}")
    return LearnedAbsolute(dim, grid_shape, head_dim, **options)


_abs.forwards_to = LearnedAbsolute  # type: ignore[attr-defined]


register("none", help="no position information", compare=("none",))(NoPE)
register(
    "abs",
    learned=True,
    help="learned absolute table over the training grid (interpolated/clamped elsewhere)",
    compare=("abs",),
)(_abs)
register("sincos", help="fixed 1D/2D/3D sin-cos absolute embedding")(SinCosAbsolute)
register("rope", axes=(1,), help="1D RoPE (`theta=10000`), identical to rotary-embedding-torch", compare=("rope",))(
    _rope
)
register(
    "axial-rope",
    axes=(2, 3),
    help="axial RoPE for 2D/3D, features split across axes (`theta=100`, rope-vit)",
    compare=("axial-rope",),
)(AxialRoPE)
register(
    "rope-mixed",
    learned=True,
    help="RoPE-Mixed: learned per-layer, per-head frequencies mixing axes (`theta=10`)",
    compare=("rope-mixed",),
)(RoPEMixed)
register(
    r"liere(?P<block_size>\d+)?",
    example="liere8",
    learned=True,
    help="LieRE with block size `block_size` (default 8); `liere2` = RoPE-Mixed, `liere64` = dense for head_dim 64",
    compare=("liere8", "liere64"),
)(LieRE)
register(
    "visionllama",
    axes=(2, 3),
    help="the LieRE paper's fixed 2D baseline, with its `[0, 1]` coordinate convention as an option",
)(VisionLlamaRoPE)
register("string-cayley", learned=True, help="STRING: commuting generators, `P RoPE(p) P^T` with Cayley `P`")(
    CayleySTRING
)
register("string-circulant", learned=True, help="STRING with skew-circulant generators, exponentiated via FFT")(
    CirculantSTRING
)
register(
    r"comrope-(?P<variant>ap|ld)(?P<block_size>\d+)?",
    example="comrope-ap8",
    learned=True,
    help="ComRoPE: commuting block-diagonal generators (axis-partitioned or linearly dependent)",
)(ComRoPE)
register(
    "rope-basis",
    learned=True,
    help="RoPE with learned frequencies in a learned orthogonal basis: what LieRE reduces to in 1D",
)(RoPEBasis)
