"""Rotations computed once in eager inference: the optional layer around ``PositionEncoding.build_rotations``.

When no gradient can flow through the rotations (grad disabled, ``torch.inference_mode``, or an encoding with no
trainable parameter, not training, given coordinates that do not require grad), ``forward`` keeps what it computed
in a small per-encoding cache and hands it out again:

- **entries** (least recently used dropped first; ``cache_size`` of them, default ``DEFAULT_CACHE_SIZE``), keyed on
  the coordinates, ``num_prefix_tokens`` and whether inference mode is on. A ``Grid`` is compared by value. A tensor
  hits when it is the same tensor, not modified since (its version counter); on the CPU also when its values equal
  the cached ones (on an accelerator that comparison would wait for the device, so a new tensor there is a miss);
- **a position table** for 1D encodings: the rotations of positions ``0 .. L-1`` computed at once (the powers path,
  ``skew_expm_progression``, for LieRE), from which every integer 1D position is sliced: a ``Grid`` of spacing 1 at
  an integer offset >= 0, or an integer coordinates tensor (x-transformers' ``pos=``; its range is read, one device
  sync). The table grows (to twice its length, appended, earlier rows never change) when a request ends within
  ``2 max(L, n, MIN_TABLE / 2)``; a request further out is computed directly. So cached decoding steps read a row,
  and a position gets the same rotation bit for bit whichever path asked for it.

Staleness is checked on every call without reading any tensor's values (no device sync): everything is dropped when
the encoding's **stamp** changed: for the encoding and its submodules (parametrizations...), the training flag and
every public attribute (``theta``, a patched ``rotations`` method...), and of every parameter, buffer and tensor
attribute its identity, version counter, storage pointer, dtype, device and shape. So optimizer steps, in-place
edits, ``p.data = ...``, ``load_state_dict``, ``.to(...)`` and swapped tensors all miss. Writes through ``p.data``
(``p.data.copy_(...)``) move no version counter, as autograd does not see them: call ``pe.clear_cache()`` after
them. A cached entry whose tensors a caller modified in place is recomputed.

Under ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and fx tracing the cache is bypassed (the graph
computes the rotations; ``liere.freeze`` makes them constants there). The cache is not part of the state dict, and
copies (``deepcopy``, pickling, ``torch.save`` of the module) start empty. A lock makes it safe to share an encoding
between threads. Turn it off per encoding with ``pe.cache_size = 0``, everywhere with ``set_rotation_cache(False)``
(or ``with rotation_cache_disabled():``); free it with ``pe.clear_cache()``; ``pe.cache_nbytes`` is its size.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from liere.coords import Grid, check_coords, is_tracing
from liere.rotations import Rotations

DEFAULT_CACHE_SIZE = 2  # entries per encoding (a position table counts as one)
MIN_TABLE = 256  # a position table may start with (or grow to) this many positions whatever the request's size
_ENABLED = [True]
_CREATE_LOCK = threading.Lock()
PLAIN = (bool, int, float, str, tuple, type(None))
Build = Callable[[Tensor | Grid, int], Rotations]  # (coords, num_prefix_tokens) -> rotations: the uncached path


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


def version(t: Tensor) -> int | None:
    """``t``'s version counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


class Same:
    """Compares equal to a ``Same`` of the very same object (a stamp part for values without a plain ``==``)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.value is self.value

    __hash__ = None  # type: ignore[assignment]


def stamp(module: nn.Module) -> tuple:
    """What ``module``'s rotations depend on besides the coordinates, read without touching any tensor's values:
    per tensor its identity, version, storage pointer, dtype, device and shape; other public attributes by value
    (plain ones) or identity."""
    parts: list[object] = []
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name in ("_parameters", "_buffers"):
                tensors = [(key, t) for key, t in value.items() if t is not None]
            elif name == "training" or not name.startswith("_"):
                if not isinstance(value, Tensor):
                    parts.append((name, value if isinstance(value, PLAIN) else Same(value)))
                    continue
                tensors = [(name, value)]
            else:
                continue
            parts += [
                (key, Same(t), None if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, t.shape)
                for key, t in tensors
            ]
    return tuple(parts)


def versions(rot: Rotations) -> tuple[int | None, ...]:
    """Version counters of the stored tensors."""
    return tuple(version(t) for t in rot.tensors().values())


def nbytes(rot: Rotations) -> int:
    return sum(t.numel() * t.element_size() for t in rot.tensors().values())


class CoordsKey:
    """A coordinates tensor as a cache key: the tensor and its version, plus a copy of its values on the CPU."""

    def __init__(self, coords: Tensor) -> None:
        self.tensor, self.version = coords, version(coords)
        self.values = coords.detach().clone() if coords.device.type == "cpu" else None

    def matches(self, coords: Tensor) -> bool:
        if coords is self.tensor and self.version is not None and version(coords) == self.version:
            return True
        held = self.values
        return (
            held is not None and held.shape == coords.shape and held.dtype == coords.dtype and torch.equal(held, coords)
        )

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()


class RotationCache:
    """One encoding's cached rotations (see the module docstring); ``max_entries = 0`` disables it.

    Holds the encoding's ``stamp`` and an LRU of entries: key -> (coordinates key or None, rotations, their version
    counters). Copies and pickles start empty.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self.lock = threading.RLock()
        self.entries: OrderedDict[tuple, tuple[CoordsKey | None, Rotations, tuple]] = OrderedDict()
        self.stamp: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_entries"])

    def __deepcopy__(self, memo: dict) -> RotationCache:
        return RotationCache(self.max_entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached rotations and coordinates."""
        with self.lock:
            held = list(self.entries.values())
        return sum((0 if key is None else key.nbytes) + nbytes(rot) for key, rot, _ in held)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.stamp = None

    def sync(self, module: nn.Module) -> None:
        """Drop every entry if ``module``'s stamp changed since the last call."""
        now = stamp(module)
        if now != self.stamp:
            self.entries.clear()
            self.stamp = now

    def get(self, key: tuple, coords: Tensor | None = None) -> Rotations | None:
        """The entry under ``key`` (for coordinates matching ``coords`` for a tensor key), else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        held, rot, stamp_ = entry
        if versions(rot) != stamp_:  # modified in place by a caller: recompute
            del self.entries[key]
            return None
        if coords is not None and not held.matches(coords):
            return None
        self.entries.move_to_end(key)
        return rot

    def put(self, key: tuple, rot: Rotations, coords: Tensor | None = None) -> None:
        self.entries[key] = (None if coords is None else CoordsKey(coords), rot, versions(rot))
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


def applicable_cache(module: nn.Module, coords: object) -> RotationCache | None:
    """``module``'s cache if ``forward`` may use it now (enabled, and no gradient can flow through the result: grad
    disabled, or no trainable parameter, coordinates that do not require grad and the module not training)."""
    if not _ENABLED[0]:
        return None
    if torch.is_grad_enabled() and (
        module.training
        or (isinstance(coords, Tensor) and coords.requires_grad)
        or any(p.requires_grad for p in module.parameters())
    ):
        return None
    cache = rotation_cache(module)
    return cache if cache.max_entries > 0 else None


def integer_positions(num_axes: int, coords: Tensor | Grid) -> tuple[slice | Tensor, int] | None:
    """1D integer positions >= 0 as a table index (a slice, or an index tensor ``(n,)`` / ``(batch, n)``) and the
    table length they need; None for anything else (float tensors, other spacings, negative positions). Reads the
    range of a tensor's positions (one device sync)."""
    if num_axes != 1:
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


def table_rotations(build: Build, length: int, table: Rotations | None) -> Rotations:
    """The rotations of positions ``0 .. length-1``: ``table``'s rows, then newly computed ones (powers path)."""
    fresh = build(Grid((length,)), 0)
    if table is None:
        return fresh
    return table.cat_positions(fresh.take_positions(slice(table.num_positions, length)))


def uncached_rotations(pe: nn.Module, coords: Tensor | Grid, num_prefix_tokens: int, build: Build) -> Rotations:
    """``build(coords, num_prefix_tokens)`` in eager mode without the cache, except that integer position tensors take
    the table's rows (so they equal the implicit positions' rotations bit for bit)."""
    held = pe.__dict__.get("_rotation_cache")
    if held is not None and held.entries and pe.training and torch.is_grad_enabled():
        held.clear()  # training resumed (after an evaluation): the entries are stale, free their memory now
    request = None if isinstance(coords, Grid) else integer_positions(pe.num_axes, coords)
    if request is None or request[1] > max(2 * request[0].numel(), MIN_TABLE):  # sparse positions: one rotation each
        return build(coords, num_prefix_tokens)
    index, length = request
    return table_rotations(build, length, None).take_positions(index).with_prefix(num_prefix_tokens)


def cached_rotations(pe: nn.Module, coords: Tensor | Grid, num_prefix_tokens: int, build: Build) -> Rotations:
    """``build(coords, num_prefix_tokens)`` through ``pe``'s cache when it applies (see the module docstring); under
    tracing, ``build`` itself. In eager eval mode, also remembers ``coords`` (what ``liere.freeze`` freezes at)."""
    if is_tracing(coords):
        return build(coords, num_prefix_tokens)
    if not pe.training:
        pe.__dict__["_last_eval_coords"] = coords.detach() if isinstance(coords, Tensor) else coords
    cache = applicable_cache(pe, coords)
    if cache is None:
        return uncached_rotations(pe, coords, num_prefix_tokens, build)
    with cache.lock:
        cache.sync(pe)
        inference = torch.is_inference_mode_enabled()
        request = integer_positions(pe.num_axes, coords)
        if request is not None:
            index, length = request
            key = ("table", inference)
            table = cache.get(key)
            have = 0 if table is None else table.num_positions
            needed = index.numel() if isinstance(index, Tensor) else index.stop - index.start
            if length <= max(2 * have, 2 * needed, MIN_TABLE):
                if length > have:
                    table = table_rotations(build, max(length, 2 * have), table)
                    cache.put(key, table)
                return table.take_positions(index).with_prefix(num_prefix_tokens)
        if isinstance(coords, Grid):
            key, held = ("grid", coords, num_prefix_tokens, inference), None
        else:
            key, held = ("tensor", num_prefix_tokens, inference), coords
        rot = cache.get(key, held)
        if rot is None:
            rot = build(coords, num_prefix_tokens)
            cache.put(key, rot, held)
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
