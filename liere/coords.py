"""Token coordinates: grids for 1D/2D/3D token layouts and validation of user-supplied coordinates."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def grid_coords(
    *shape: int,
    spacing: float | Sequence[float] = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Coordinates of every cell of a row-major grid, shape ``(prod(shape), len(shape))``.

    Axis ``a`` of cell index ``(i_0, ..., i_k)`` has coordinate ``i_a * spacing[a]``: with the default
    ``spacing=1`` the coordinates are integer token/patch indices (the RoPE and rope-vit convention), so a
    larger image simply has more positions at the same spacing. The official LieRE code instead squeezes
    each axis into ``[0, 1]``; pass ``spacing=[1/(n-1) for n in shape]`` for that. Rows follow
    ``torch.flatten`` order of a ``(*shape)`` tensor, i.e. the order of ``conv_out.flatten(2)`` tokens.

    >>> grid_coords(2, 3)[:, 0].tolist(), grid_coords(2, 3)[:, 1].tolist()
    ([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    """
    if not shape:
        raise ValueError("grid_coords: give at least one grid size, e.g. grid_coords(14, 14)")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
        raise ValueError(f"grid_coords: shape must be positive ints, got {shape}")
    spacings = [float(spacing)] * len(shape) if isinstance(spacing, (int, float)) else list(spacing)
    if len(spacings) != len(shape):
        raise ValueError(f"grid_coords: spacing has {len(spacings)} entries, expected one per axis ({len(shape)})")
    axes = [torch.arange(n, device=device, dtype=dtype) * s for n, s in zip(shape, spacings, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def check_coords(coords: Tensor, num_axes: int) -> Tensor:
    """Validate ``coords`` of shape ``(n, num_axes)`` or ``(batch, n, num_axes)``; return them as 3-D.

    The returned tensor has shape ``(S, n, num_axes)`` where ``S`` is 1 for coordinates shared by the
    batch. Raises on wrong type, rank, axis count or non-finite values; nothing is broadcast silently.
    """
    if not isinstance(coords, Tensor):
        raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
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
    if coords.is_floating_point() and not torch.compiler.is_compiling() and not _is_finite(coords):
        raise ValueError("coords contain NaN or inf; every coordinate must be finite")
    return coords if coords.dim() == 3 else coords.unsqueeze(0)


def _is_finite(coords: Tensor) -> bool:
    return _memo(coords, "finite", lambda: bool(torch.isfinite(coords).all()))


def arithmetic_progression(coords: Tensor) -> tuple[float, float] | None:
    """``(start, step)`` when validated 1D coords ``(1, n, 1)`` are ``start + i * step`` for ``i < n``, else None.

    Equality is up to a few fp32 roundings of the largest coordinate (``grid_coords(n, spacing=1/(n-1))``
    qualifies). Costs one device sync per coordinates tensor (cached per tensor version); under
    ``torch.compile`` it answers None (no sync inside a graph), so compiled models take the general path.
    """
    if coords.dim() != 3 or coords.shape[0] != 1 or coords.shape[2] != 1 or coords.shape[1] < 2:
        return None
    if torch.compiler.is_compiling():
        return None

    def detect() -> tuple[float, float] | None:
        p = coords[0, :, 0].double()
        start, step = p[0], p[1] - p[0]
        ramp = start + step * torch.arange(p.shape[0], dtype=p.dtype, device=p.device)
        error, scale = (p - ramp).abs().max(), p.abs().max().clamp(min=1)
        start, step, ok = torch.stack([start, step, error <= 8 * torch.finfo(coords.dtype).eps * scale]).tolist()
        return (start, step) if ok else None

    return _memo(coords, "progression", detect)


# Facts about a coordinates tensor (finite? an arithmetic progression?) cost a device sync to establish.
# They are remembered per tensor, weakly and with its version counter, so a model reusing its cached grid
# coordinates pays once; an in-place change bumps the version and forces a new look.
_FACTS: dict[int, tuple[weakref.ref, int, dict[str, Any]]] = {}


def _memo(coords: Tensor, fact: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered as ``fact`` about this version of ``coords``."""
    key = id(coords)
    entry = _FACTS.get(key)
    if entry is None or entry[0]() is not coords or entry[1] != coords._version:
        entry = (weakref.ref(coords, lambda _: _FACTS.pop(key, None)), coords._version, {})
        _FACTS[key] = entry
    if fact not in entry[2]:
        entry[2][fact] = compute()
    return entry[2][fact]


class CoordsCache:
    """The coordinates of the last grid seen (a plain attribute, so not part of any state dict)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._coords: Tensor | None = None

    def __call__(self, shape: Sequence[int], spacing: Sequence[float], device: torch.device) -> Tensor:
        """``grid_coords(*shape, spacing=spacing)`` on ``device``, recomputed only when an argument changes."""
        key = (tuple(shape), tuple(spacing), device)
        if key != self._key:
            self._coords = grid_coords(*shape, spacing=list(spacing), device=device)
            self._key = key
        return self._coords
