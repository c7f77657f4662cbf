"""Rotations computed once at inference: the cache behind every encoding's ``forward`` (``PositionEncoding``).

Rotations depend only on the coordinates and the encoding's weights. When no gradient can flow through them (grad
disabled, ``torch.inference_mode``, or an encoding with no trainable parameter) and the module is not training with
grad enabled, ``forward`` keeps what it computed in a small per-encoding cache and hands it out again:

- **entries** (a least-recently-used list of ``cache_size`` entries, default ``DEFAULT_CACHE_SIZE``), keyed on the
  coordinates (a ``Grid`` by value; a tensor by its values, compared on every call), ``num_prefix_tokens`` and
  whether inference mode is on;
- **a position table** for 1D encodings: the rotations of token positions ``0 .. L-1`` computed at once (the powers
  path, ``skew_expm_progression``, for LieRE), from which every integer 1D position is sliced: a ``Grid`` of spacing
  1 at an integer offset >= 0, or an integer coordinates tensor (x-transformers' ``pos=``). The table grows (to
  twice its length, appended, earlier rows never change) when a request ends within ``2 max(L, n, MIN_TABLE / 2)``;
  a request further out is computed directly. So cached decoding steps read a row instead of computing an
  exponential, and a position gets the same rotation bit for bit whichever path asked for it.

Everything is dropped whenever a result could differ: the cache holds a copy of the encoding's parameters and buffers
and compares them on every call (so ``p.data.copy_``, ``p.data = ...``, optimizer steps and ``load_state_dict`` all
miss), plus their dtypes and devices and the modules' plain attributes (``training``, ``theta``, ...). A cached entry
whose tensors a caller modified in place (their version counter moved) is recomputed. Under ``torch.compile``,
``torch.export``, ``torch.jit.trace`` and fx tracing the cache is bypassed: the traced graph computes the rotations
from the parameters (an export of an eval model holds that computation, not constants). The cache is not part of
the state dict, and copies (``deepcopy``, pickling, ``torch.save`` of the module) start empty. A lock makes it safe
to share an encoding between threads.

Turn it off per encoding with ``pe.cache_size = 0``, everywhere with ``set_rotation_cache(False)`` (or ``with
rotation_cache_disabled():``); free it with ``pe.clear_cache()``; ``pe.cache_nbytes`` is its size. See
docs/inference.md.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from liere.coords import Grid, check_coords, is_tracing
from liere.fx import is_symbolic_tracing
from liere.rotations import Rotations

if TYPE_CHECKING:
    from liere.encoding import PositionEncoding

DEFAULT_CACHE_SIZE = 2  # entries per encoding (a position table counts as one)
MIN_TABLE = 256  # a position table may start with (or grow to) this many positions whatever the request's size
_ENABLED = [True]
_CREATE_LOCK = threading.Lock()
PLAIN = (bool, int, float, str, tuple, type(None))


def set_rotation_cache(enabled: bool) -> bool:
    """Turn the rotation cache of every encoding on or off (on by default); returns the previous setting."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _ENABLED[0] = _ENABLED[0], enabled
    return previous


@contextmanager
def rotation_cache_disabled() -> Iterator[None]:
    """``set_rotation_cache(False)`` for the duration of the ``with`` block."""
    previous = set_rotation_cache(False)
    try:
        yield
    finally:
        set_rotation_cache(previous)


def rotation_tensors(rot: Rotations) -> list[Tensor]:
    """The tensors a ``Rotations`` stores."""
    return [t for t in (rot.cos, rot.sin, rot.basis, rot.blocks) if t is not None]


def nbytes(rot: Rotations) -> int:
    return sum(t.numel() * t.element_size() for t in rotation_tensors(rot))


def versions(rot: Rotations) -> tuple[int | None, ...]:
    """Version counters of the stored tensors (None for inference tensors, which have none)."""
    return tuple(None if t.is_inference() else t._version for t in rotation_tensors(rot))


def take_positions(rot: Rotations, index: slice | Tensor) -> Rotations:
    """Rotations of positions ``index`` of shared rotations ``rot`` (``S = 1``): a ``slice``, integer positions
    ``(n,)`` (shared) or ``(batch, n)`` (per sample). Position-independent parts (a basis) are kept."""

    def take(t: Tensor) -> Tensor:  # (depth, 1, H, L, ...) -> (depth, 1 or batch, H, n, ...)
        if isinstance(index, slice):
            return t[:, :, :, index]
        if index.dim() == 1:
            return t.index_select(3, index)
        return t[:, 0][:, :, index].movedim(2, 1)

    if rot.is_identity:
        count = len(range(*index.indices(rot.num_positions))) if isinstance(index, slice) else index.shape[-1]
        return Rotations.identity(rot.head_dim, count, rot.depth)
    if rot.blocks is not None:
        return Rotations(rot.head_dim, blocks=take(rot.blocks))
    return Rotations(rot.head_dim, cos=take(rot.cos), sin=take(rot.sin), basis=rot.basis)


def cat_positions(first: Rotations, second: Rotations) -> Rotations:
    """Rotations of ``first``'s positions followed by ``second``'s (same layout; a basis is shared)."""
    if first.is_identity:
        return Rotations.identity(first.head_dim, first.num_positions + second.num_positions, first.depth)
    if first.blocks is not None:
        return Rotations(first.head_dim, blocks=torch.cat([first.blocks, second.blocks], dim=3))
    cos, sin = (torch.cat([a, b], dim=3) for a, b in ((first.cos, second.cos), (first.sin, second.sin)))
    return Rotations(first.head_dim, cos=cos, sin=sin, basis=first.basis)


class RotationCache:
    """One encoding's cached rotations (see the module docstring); ``max_entries = 0`` disables it.

    Holds a snapshot of the encoding's tensors and settings (``sync``), and an LRU of entries: key -> (coordinates
    tensor or None, rotations, their version counters). Copies and pickles start empty.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self.lock = threading.RLock()
        self.entries: OrderedDict[tuple, tuple[Tensor | None, Rotations, tuple]] = OrderedDict()
        self.settings: tuple | None = None
        self.snapshot: list[Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_entries"])

    def __deepcopy__(self, memo: dict) -> RotationCache:
        return RotationCache(self.max_entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached rotations and coordinates (the parameter snapshot not counted)."""
        with self.lock:
            held = [(coords, rot) for coords, rot, _ in self.entries.values()]
        coords_bytes = sum(c.numel() * c.element_size() for c, _ in held if c is not None)
        return coords_bytes + sum(nbytes(rot) for _, rot in held)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.settings, self.snapshot = None, []

    def sync(self, module: nn.Module) -> None:
        """Drop every entry if ``module``'s tensors or settings differ from the snapshot (then take a new one)."""
        tensors = [t.detach() for t in chain(module.parameters(), module.buffers())]
        plain = tuple(
            tuple((k, v) for k, v in vars(m).items() if isinstance(v, PLAIN) and not k.startswith("_"))
            for m in module.modules()
        )
        settings = (plain, tuple((t.dtype, t.device, t.shape) for t in tensors))
        if settings == self.settings and all(torch.equal(a, b) for a, b in zip(self.snapshot, tensors, strict=True)):
            return
        self.entries.clear()
        self.settings, self.snapshot = settings, [t.clone() for t in tensors]

    def get(self, key: tuple, coords: Tensor | None = None) -> Rotations | None:
        """The entry under ``key`` (with coordinates equal to ``coords`` for a tensor key), else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        stored, rot, stamp = entry
        if versions(rot) != stamp:  # modified in place by a caller: recompute
            del self.entries[key]
            return None
        if coords is not None and not (
            stored.shape == coords.shape and stored.dtype == coords.dtype and torch.equal(stored, coords)
        ):
            return None
        self.entries.move_to_end(key)
        return rot

    def put(self, key: tuple, rot: Rotations, coords: Tensor | None = None) -> None:
        self.entries[key] = (coords, rot, versions(rot))
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def rotation_cache(module: nn.Module) -> RotationCache:
    """``module``'s cache, created on first use (also for modules unpickled from before the cache existed)."""
    cache = module.__dict__.get("_rotation_cache")
    if cache is None:
        with _CREATE_LOCK:
            cache = module.__dict__.setdefault("_rotation_cache", RotationCache())
    return cache


def cache_applies(module: nn.Module, coords: object) -> bool:
    """Whether ``forward`` may use the cache now: enabled, not tracing, and no gradient can flow through the result
    (grad disabled, or no trainable parameter and the module not training)."""
    if not _ENABLED[0] or is_tracing(coords) or is_symbolic_tracing():
        return False
    if torch.is_grad_enabled() and (module.training or any(p.requires_grad for p in module.parameters())):
        return False
    return rotation_cache(module).max_entries > 0


def integer_positions(pe: PositionEncoding, coords: Tensor | Grid) -> tuple[slice | Tensor, int] | None:
    """1D integer positions >= 0 as a table index (a slice, or an index tensor ``(n,)`` / ``(batch, n)``) and the
    table length they need; None for anything else (float tensors, other spacings, negative positions). Reads the
    positions' range (one device sync)."""
    if pe.num_axes != 1:
        return None
    if isinstance(coords, Grid):
        if coords.num_axes != 1:
            return None
        (n,), (step,), (start,) = coords.shape, coords.spacing, coords.offset
        if step != 1.0 or start != int(start) or start < 0:
            return None
        return slice(int(start), int(start) + n), int(start) + n
    if not isinstance(coords, Tensor) or coords.is_floating_point() or coords.dtype == torch.bool:
        return None
    index = check_coords(coords, 1)[..., 0]  # (S, n)
    low, high, shared = torch.stack([*torch.aminmax(index), (index == index[:1]).all()]).tolist()
    if low < 0:
        return None
    # the same positions in every row (x-transformers' pos repeated over the batch): shared rotations, applied as
    # the implicit positions' are (per-sample rotations take another, not bitwise equal, einsum path)
    return (index[0] if shared else index), high + 1


def table_rotations(pe: PositionEncoding, length: int, table: Rotations | None) -> Rotations:
    """The rotations of positions ``0 .. length-1``: ``table``'s rows, then newly computed ones (powers path)."""
    fresh = pe.build_rotations(Grid((length,)))
    if table is None:
        return fresh
    return cat_positions(table, take_positions(fresh, slice(table.num_positions, length)))


def cached_rotations(pe: PositionEncoding, coords: Tensor | Grid, num_prefix_tokens: int) -> Rotations:
    """``pe(coords, num_prefix_tokens)`` through the cache when it applies (see the module docstring)."""
    if not cache_applies(pe, coords):
        held = pe.__dict__.get("_rotation_cache")
        if held is not None and held.entries and pe.training and torch.is_grad_enabled() and not is_tracing(coords):
            held.clear()  # training resumed (after an evaluation): the entries are stale, free their memory now
        request = None if is_tracing(coords) else integer_positions(pe, coords)
        if request is None or isinstance(request[0], slice):  # a Grid: its own powers are the table's rows
            return pe.build_rotations(coords, num_prefix_tokens)
        index, length = request
        if length > max(2 * index.numel(), MIN_TABLE):  # sparse positions: one rotation each is cheaper
            return pe.build_rotations(coords, num_prefix_tokens)
        return take_positions(table_rotations(pe, length, None), index).with_prefix(num_prefix_tokens)
    cache = rotation_cache(pe)
    with cache.lock:
        cache.sync(pe)
        inference = torch.is_inference_mode_enabled()
        request = integer_positions(pe, coords)
        if request is not None:
            index, length = request
            key = ("table", inference)
            table = cache.get(key)
            have = 0 if table is None else table.num_positions
            needed = index.numel() if isinstance(index, Tensor) else index.stop - index.start
            if length <= max(2 * have, 2 * needed, MIN_TABLE):
                if length > have:
                    table = table_rotations(pe, max(length, 2 * have), table)
                    cache.put(key, table)
                return take_positions(table, index).with_prefix(num_prefix_tokens)
        if isinstance(coords, Grid):
            key, stored = ("grid", coords, num_prefix_tokens, inference), None
        else:
            key, stored = ("tensor", num_prefix_tokens, inference), coords.detach()
        rot = cache.get(key, stored)
        if rot is None:
            rot = pe.build_rotations(coords, num_prefix_tokens)
            cache.put(key, rot, None if stored is None else stored.clone())
        return copy.copy(rot)


class CachedRotationsMixin:
    """What ``PositionEncoding`` exposes of its rotation cache: ``cache_size``, ``clear_cache``, ``cache_nbytes``."""

    @property
    def cache_size(self) -> int:
        """Cached entries kept (least recently used dropped first); 0 turns this encoding's cache off."""
        return rotation_cache(self).max_entries

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {value!r}")
        cache = rotation_cache(self)
        with cache.lock:
            cache.max_entries = value
            while len(cache.entries) > value:
                cache.entries.popitem(last=False)

    def clear_cache(self) -> None:
        """Free the cached rotations (they are recomputed on the next call)."""
        rotation_cache(self).clear()

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the cached rotations."""
        return rotation_cache(self).nbytes


def cache_repr(nbytes_held: int) -> str:
    """``extra_repr`` field of a non-empty cache, e.g. ``cache=12.5MB``."""
    return f"cache={nbytes_held / 1e6:.3g}MB"
