"""Token coordinates: ``Grid`` (a regular grid, known finite and evenly spaced without reading any tensor),
``grid_coords`` (its coordinates as a tensor) and the validation of coordinate tensors given by the user."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

Progression = tuple[float, float]  # (start, step) of 1D positions start + i * step, i = 0 .. n-1


def coordinate_limit(dtype: torch.dtype) -> float:
    """Largest coordinate magnitude accepted for coordinates of ``dtype``: the square root of the largest number of
    the dtype rotations are built in (at least fp32; ~1.8e19 there), so a coordinate times a frequency or generator
    entry up to the same size cannot overflow to inf (and give NaN rotations)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).max ** 0.5


def _is_int(value: object) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _per_axis(value: object, num_axes: int, name: str) -> tuple[float, ...]:
    """``value`` (one number, or one per axis) as a tuple of ``num_axes`` finite numbers."""
    values = (value,) * num_axes if not isinstance(value, Sequence) else tuple(value)
    if len(values) != num_axes:
        raise ValueError(f"{name} has {len(values)} entries, expected one per axis ({num_axes})")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.SymInt, torch.SymFloat)):
            raise TypeError(f"{name} must be numbers, got {value!r}")
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value!r}")
    return tuple(v if isinstance(v, (torch.SymInt, torch.SymFloat)) else float(v) for v in values)


@dataclass(frozen=True)
class Grid:
    """A row-major grid of token positions: axis ``a`` of cell ``(i_0, ..., i_k)`` is at
    ``offset[a] + i_a * spacing[a]``.

    Pass a ``Grid`` to an encoding (``pe(Grid((14, 14)))``) instead of its coordinates tensor: a grid is known to be
    finite and evenly spaced, so nothing is validated by reading values (no device sync), and LieRE / ComRoPE
    compute a 1D grid as powers of one exponential (``skew_expm_progression``), also under ``torch.compile`` and
    ``torch.export``. ``shape`` is ``(n,)`` (an int is accepted), ``(h, w)`` or ``(t, h, w)``; ``spacing`` and
    ``offset`` are one number for every axis or one per axis (normalised to tuples). KV-cached decoding of the
    next ``k`` tokens after ``c`` cached ones is ``Grid((k,), offset=c)``.
    """

    shape: tuple[int, ...]
    spacing: float | tuple[float, ...] = 1.0
    offset: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        shape = (self.shape,) if _is_int(self.shape) else self.shape
        shape = tuple(shape) if isinstance(shape, Sequence) else ()
        if torch.jit.is_tracing():  # traced sizes are 0-dim tensors: the traced graph has this grid's size
            shape = tuple(int(s) if isinstance(s, Tensor) else s for s in shape)
        if not shape:
            raise ValueError(f"shape needs at least one grid size, e.g. Grid((14, 14)), got {self.shape!r}")
        if not all(_is_int(s) and s >= 1 for s in shape):
            raise ValueError(f"shape must be positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", _per_axis(self.spacing, len(shape), "spacing"))
        object.__setattr__(self, "offset", _per_axis(self.offset, len(shape), "offset"))

    @property
    def num_axes(self) -> int:
        return len(self.shape)

    @property
    def num_positions(self) -> int:
        return math.prod(self.shape)

    def coords(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Coordinates ``(prod(shape), num_axes)`` in ``torch.flatten`` order of a ``(*shape)`` tensor (the order of
        ``conv_out.flatten(2)`` tokens): ``grid_coords(*shape, spacing=spacing) + offset``."""
        axes = []
        for n, step, start in zip(self.shape, self.spacing, self.offset, strict=True):
            if all(isinstance(v, (int, float)) for v in (n, step, start)):
                _check_extent(abs(start) + (n - 1) * abs(step), dtype)
            axis = torch.arange(n, device=device, dtype=dtype) * step
            axes.append(axis + start if start != 0 else axis)
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.num_axes)

    def progression(self) -> Progression | None:
        """``(start, step)`` of a 1D grid with concrete (not symbolic) numbers, else None."""
        if self.num_axes != 1 or not all(
            isinstance(v, (int, float)) for v in (*self.shape, *self.spacing, *self.offset)
        ):
            return None
        return self.offset[0], self.spacing[0]


def _check_extent(extent: float, dtype: torch.dtype) -> None:
    """Refuse grid coordinates reaching ``extent`` beyond ``coordinate_limit(dtype)`` (one line naming coords)."""
    if extent > coordinate_limit(dtype):
        raise ValueError(
            f"coords: the grid reaches |coordinate| = {extent:.3g}, beyond {coordinate_limit(dtype):.3g} for {dtype} "
            "(rotations would overflow); use a smaller spacing or offset"
        )


def grid_coords(
    *shape: int,
    spacing: float | Sequence[float] = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Coordinates of every cell of a row-major grid, shape ``(prod(shape), len(shape))``: ``Grid(shape,
    spacing).coords(device, dtype)``.

    Axis ``a`` of cell index ``(i_0, ..., i_k)`` has coordinate ``i_a * spacing[a]``: with the default
    ``spacing=1`` the coordinates are integer token/patch indices (the RoPE and rope-vit convention), so a
    larger image simply has more positions at the same spacing. The official LieRE code instead squeezes
    each axis into ``[0, 1]``; pass ``spacing=[1/(n-1) for n in shape]`` for that. Rows follow
    ``torch.flatten`` order of a ``(*shape)`` tensor, i.e. the order of ``conv_out.flatten(2)`` tokens.
    Encodings given the ``Grid`` itself skip validating the values (see ``Grid``).

    >>> grid_coords(2, 3)[:, 0].tolist(), grid_coords(2, 3)[:, 1].tolist()
    ([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    """
    return Grid(shape, spacing).coords(device, dtype)


def in_func_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``functional_call`` under them...):
    values of batched tensors cannot be read there, custom autograd Functions need vmap rules and saved-tensor hooks
    (``torch.utils.checkpoint``) are refused, so the library takes its plain autograd paths."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def is_tracing(coords: object = None) -> bool:
    """True under ``torch.compile`` / ``torch.export`` (strict and non-strict), ``torch.jit.trace``, with an fx
    ``Proxy`` or inside a ``torch.func`` transform: no Python bool may be read from tensor values there, so value
    checks are skipped."""
    return (
        in_func_transform()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or isinstance(coords, torch.fx.Proxy)
    )


def check_coords(coords: Tensor, num_axes: int) -> Tensor:
    """Validate the shape and dtype of ``coords`` ``(n, num_axes)`` or ``(batch, n, num_axes)``; return them as 3-D.

    The returned tensor has shape ``(S, n, num_axes)`` where ``S`` is 1 for coordinates shared by the batch.
    Values are checked by ``inspect_coords``. Nothing is broadcast silently.
    """
    if isinstance(coords, torch.fx.Proxy):
        return coords.reshape(-1, coords.shape[-2], num_axes)
    if not isinstance(coords, Tensor):
        raise TypeError(f"coords must be a torch.Tensor or a liere.Grid, got {type(coords).__name__}")
    if not (coords.is_floating_point() or coords.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"coords must be a float or integer tensor, got dtype {coords.dtype}")
    if coords.dim() not in (2, 3):
        raise ValueError(
            f"coords must have shape (n, num_axes) or (batch, n, num_axes) with num_axes={num_axes}, "
            f"got shape {tuple(coords.shape)}"
        )
    if coords.shape[-1] != num_axes:
        raise ValueError(
            f"coords has {coords.shape[-1]} axes (last dim) but the encoding was built with "
            f"num_axes={num_axes}; got shape {tuple(coords.shape)}"
        )
    if coords.shape[-2] == 0:
        raise ValueError("coords must hold at least one position, got n=0")
    return coords if coords.dim() == 3 else coords.unsqueeze(0)


def inspect_coords(coords: Tensor, detect_progression: bool = False) -> Progression | None:
    """Raise if validated ``coords`` ``(S, n, axes)`` hold NaN, inf or a magnitude above ``coordinate_limit``; with
    ``detect_progression``, also return ``(start, step)`` when they are shared 1D positions ``start + i * step``
    (``n >= 2``) that carry no derivatives (the powers path computes from the two numbers), else None.

    Reads the values on every call (one device sync for both answers; nothing is cached, so in-place edits are
    always seen). Under tracing (``is_tracing``) nothing is read: no check, no progression. Equality is up to a
    few roundings of the largest coordinate (``grid_coords(n, spacing=1/(n-1))`` qualifies).
    """
    if is_tracing(coords):
        return None
    if coords.is_floating_point():  # |p| <= coordinate_limit exactly when p * p is finite (in the build dtype)
        wide = coords.to(torch.promote_types(coords.dtype, torch.float32))
        finite = torch.isfinite(wide * wide).all()
    else:  # int64 magnitudes stay below the fp32 limit
        finite = torch.ones((), dtype=torch.bool)
    progression = None
    derivatives = coords.requires_grad or forward_ad.unpack_dual(coords).tangent is not None
    if (
        detect_progression
        and not derivatives
        and coords.shape[0] == 1
        and coords.shape[2] == 1
        and coords.shape[1] >= 2
    ):
        p = coords[0, :, 0].double()
        start, step = p[0], p[1] - p[0]
        ramp = start + step * torch.arange(p.shape[0], dtype=p.dtype, device=p.device)
        eps = torch.finfo(coords.dtype).eps if coords.is_floating_point() else 0.0
        evenly = (p - ramp).abs().max() <= 8 * eps * p.abs().max().clamp(min=1)
        ok, start_, step_, evenly_ = torch.stack([finite.double(), start, step, evenly.double()]).tolist()
        finite, progression = ok, ((start_, step_) if evenly_ else None)
    if not bool(finite):
        raise ValueError(
            f"coords contain NaN or inf or |coordinate| > {coordinate_limit(coords.dtype):.3g}; every coordinate must "
            f"be finite and at most that large for {coords.dtype} (rotations would overflow)"
        )
    return progression


def resolve_coords(
    coords: Tensor | Grid,
    num_axes: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    detect_progression: bool = False,
) -> tuple[Tensor, Progression | None]:
    """Coordinates ``(S, n, num_axes)`` in at least ``dtype`` and, with ``detect_progression``, their 1D progression.

    A ``Grid`` is built on ``device`` in ``dtype`` and its progression is known; a tensor stays where it is (in
    the promotion of its dtype and ``dtype``) and is validated by ``check_coords`` and ``inspect_coords``.
    """
    if isinstance(coords, Grid):
        if coords.num_axes != num_axes:
            raise ValueError(
                f"the grid has {coords.num_axes} axes (shape {coords.shape}) but the encoding was built with "
                f"num_axes={num_axes}"
            )
        return coords.coords(device, dtype)[None], coords.progression() if detect_progression else None
    values = check_coords(coords, num_axes)
    progression = inspect_coords(values, detect_progression)
    return values.to(torch.promote_types(values.dtype, dtype)), progression
