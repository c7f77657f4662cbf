"""Frozen rotations for serving: ``freeze(model, grid)`` computes every encoding's rotations once, as buffers.

A frozen encoding's ``forward`` reads its buffers (``frozen_cos``, ``frozen_sin``, ``frozen_blocks``,
``frozen_basis``: those its kind of ``Rotations`` stores) and prepends the identity for prefix tokens: no
exponential, no value check and no data-dependent branch, so ``torch.compile``, ``torch.export``,
``torch.jit.trace`` and ONNX export see constants. The results equal the unfrozen encoding's bit for bit.

What a frozen encoding serves:

- the coordinates it was frozen for: an equal ``Grid``, or a tensor with the same values (compared in eager mode,
  one device sync; under tracing only the shape is checked);
- frozen for a 1D ``Grid((L,))`` (a position table), also every 1D ``Grid`` of spacing 1 at an integer offset
  inside it (KV-cached decoding) and integer position tensors ``(n, 1)`` / ``(batch, n, 1)`` (x-transformers' ``pos``).

Anything else raises ``ValueError`` (freeze for those coordinates, or ``unfreeze``). Training a frozen encoding (a
forward in training mode with grad enabled and trainable parameters) raises, and so does an eager call after its
weights changed in place (an optimizer step); ``load_state_dict`` recomputes the frozen rotations from the loaded
weights. The buffers are not in the state dict (a checkpoint of a frozen model loads into an unfrozen one and back);
``deepcopy``, pickling and ``torch.save`` of the module keep them. Casting the model (``.to(torch.bfloat16)``)
keeps their dtype, as the rotations are built in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from liere.coords import Grid, check_coords, is_tracing
from liere.rotations import Rotations

PREFIX = "frozen_"  # buffer names: frozen_cos, frozen_sin, frozen_blocks, frozen_basis
FIELDS = ("cos", "sin", "blocks", "basis")
Coords = Grid | Tensor


@runtime_checkable
class Encoding(Protocol):
    """What freezing needs of an encoding (``PositionEncoding``)."""

    head_dim: int
    num_axes: int

    def build_rotations(self, coords: Coords, num_prefix_tokens: int = 0) -> Rotations: ...

    def clear_cache(self) -> None: ...


@dataclass(frozen=True)
class FrozenState:
    """What an encoding was frozen for: ``coords`` (a ``Grid`` or a detached tensor), the ``(depth, S, H, n)`` of
    its rotations (for the identity, which stores no tensor), and its weights' ``(version, data_ptr)`` then."""

    coords: Coords
    lead: tuple[int, int, int, int]
    weights: tuple[tuple[int, int], ...]

    @property
    def table_length(self) -> int | None:
        """``L`` when frozen for ``Grid((L,))`` (positions 0 .. L-1, a table sliced by 1D requests), else None."""
        grid = self.coords
        if isinstance(grid, Grid) and grid.num_axes == 1 and grid.spacing == (1.0,) and grid.offset == (0.0,):
            return grid.shape[0]
        return None


def frozen_state(encoding: nn.Module) -> FrozenState | None:
    """The encoding's ``FrozenState``, None when it is not frozen."""
    return encoding.__dict__.get("_frozen")


def weight_stamp(encoding: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(version, data_ptr)`` of every parameter and (non-frozen) buffer: moves with any in-place change or swap."""
    tensors = [*encoding.parameters(), *(b for n, b in encoding.named_buffers() if not n.startswith(PREFIX))]
    return tuple((t._version, t.data_ptr()) for t in tensors)


def encodings_in(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, encoding)`` of every position encoding in ``model`` (``model`` itself included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, Encoding):
            yield name or type(module).__name__, module


def install(encoding: nn.Module, coords: Coords, rot: Rotations) -> None:
    """Store ``rot`` (computed for ``coords``) as the encoding's frozen buffers."""
    remove(encoding)
    for field, tensor in rot.tensors().items():
        encoding.register_buffer(PREFIX + field, tensor, persistent=False)
    encoding.__dict__["_frozen"] = FrozenState(coords, rot._lead, weight_stamp(encoding))
    encoding.clear_cache()  # not read while frozen


def remove(encoding: nn.Module) -> None:
    """Drop the encoding's frozen buffers and state."""
    for name in [n for n in encoding._buffers if n.startswith(PREFIX)]:
        del encoding._buffers[name]
    encoding.__dict__.pop("_frozen", None)


def compute(encoding: Encoding, coords: Coords) -> Rotations:
    """The rotations to freeze for ``coords`` (detached, built as an unfrozen eager call builds them)."""
    with torch.no_grad():
        return encoding.build_rotations(coords)


def freeze(model: nn.Module, grid: Coords | None = None) -> nn.Module:
    """Freeze every encoding in ``model`` (a module, or an encoding) at ``grid`` (a ``Grid`` or a coordinates
    tensor), or, when None, at the coordinates each last ran with in eval mode; returns ``model``.

    All rotations are computed before any encoding changes: on error nothing is frozen.
    """
    if grid is not None and not isinstance(grid, (Grid, Tensor)):
        raise TypeError(f"grid must be a liere.Grid, a coordinates tensor or None, got {type(grid).__name__}")
    plans = []
    for name, encoding in encodings_in(model):
        coords = grid if grid is not None else encoding.__dict__.get("_last_eval_coords")
        if coords is None:
            raise ValueError(f"{name} has not run in eval mode: run the model once in eval mode or pass grid=")
        coords = coords if isinstance(coords, Grid) else coords.detach().clone()
        plans.append((encoding, coords, compute(encoding, coords)))
    if not plans:
        raise ValueError(f"{type(model).__name__} holds no liere position encoding to freeze")
    for encoding, coords, rot in plans:
        install(encoding, coords, rot)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo ``freeze``: every encoding in ``model`` computes its rotations again; returns ``model``."""
    for _, encoding in encodings_in(model):
        remove(encoding)
    return model


def refreeze(encoding: Encoding) -> None:
    """Recompute a frozen encoding's rotations from its current weights, on its current device and in its dtype
    (after ``load_state_dict``, ``.to(...)``)."""
    state = frozen_state(encoding)
    if state is None:
        return
    coords = state.coords
    if isinstance(coords, Tensor):
        weights = [*encoding.parameters(), *(b for n, b in encoding.named_buffers() if not n.startswith(PREFIX))]
        coords = coords.to(weights[0].device) if weights else coords
    install(encoding, coords, compute(encoding, coords))


def restamp(encoding: nn.Module) -> None:
    """Take the weights' stamp again after a copy (``deepcopy``, unpickling: new tensors, the same values)."""
    state = frozen_state(encoding)
    if state is not None:
        encoding.__dict__["_frozen"] = replace(state, weights=weight_stamp(encoding))


def frozen_rotations(encoding: nn.Module, coords: Coords, num_prefix_tokens: int) -> Rotations:
    """``encoding(coords, num_prefix_tokens)`` of a frozen encoding: its buffers, with the prefix prepended."""
    state = frozen_state(encoding)
    name = type(encoding).__name__
    if encoding.training and torch.is_grad_enabled() and any(p.requires_grad for p in encoding.parameters()):
        raise RuntimeError(
            f"{name} is frozen (liere.freeze): its rotations are constants that train nothing; "
            "call liere.unfreeze(model) before training"
        )
    if isinstance(coords, Tensor) and coords.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} is frozen (liere.freeze): its rotations are constants, with no gradient for coords")
    tracing = is_tracing(coords)
    if not tracing and weight_stamp(encoding) != state.weights:
        raise RuntimeError(
            f"{name}'s weights changed after liere.freeze (an optimizer step or an in-place edit); "
            "call liere.freeze again (or liere.unfreeze)"
        )
    stored = {field: t for field in FIELDS if (t := encoding._buffers.get(PREFIX + field)) is not None}
    rot = Rotations(encoding.head_dim, **stored) if stored else Rotations(encoding.head_dim, shape=state.lead)
    index = table_index(state, coords, tracing, name)
    if index is None:
        check_same_coords(state, coords, tracing, name)
    else:
        rot = rot.take_positions(index)
    return rot.with_prefix(num_prefix_tokens)


def table_index(state: FrozenState, coords: Coords, tracing: bool, name: str) -> slice | Tensor | None:
    """Rows of a frozen 1D table serving ``coords`` (a slice for a ``Grid``, positions for an integer tensor), or
    None when ``coords`` are to be compared with the frozen coordinates as a whole."""
    length = state.table_length
    if length is None or (isinstance(coords, Grid) and coords == state.coords):
        return None
    if isinstance(coords, Grid):
        (start,), (step,) = coords.offset[:1], coords.spacing[:1]
        n = coords.shape[0]
        if coords.num_axes != 1 or step != 1.0 or start != int(start) or not 0 <= start <= length - n:
            raise ValueError(f"{name} is frozen for positions 0..{length - 1}; it cannot serve {coords}")
        return slice(int(start), int(start) + n)
    if not isinstance(coords, Tensor) or coords.is_floating_point() or coords.dtype == torch.bool:
        return None
    index = check_coords(coords, 1)[..., 0]  # (S, n)
    if tracing:
        return index[0] if index.shape[0] == 1 else index
    low, high, shared = torch.stack([*torch.aminmax(index), (index == index[:1]).all()]).tolist()
    if low < 0 or high >= length:
        raise ValueError(f"{name} is frozen for positions 0..{length - 1}; got positions {low}..{high}")
    return index[0] if shared else index  # the same positions in every row: shared rotations, as unfrozen


def check_same_coords(state: FrozenState, coords: Coords, tracing: bool, name: str) -> None:
    """Raise unless ``coords`` are the frozen coordinates: an equal ``Grid``, or a tensor of the same shape and dtype
    (and, in eager mode, values)."""
    frozen = state.coords
    if isinstance(frozen, Grid):
        same = isinstance(coords, Grid) and coords == frozen
    else:
        same = isinstance(coords, Tensor) and coords.shape == frozen.shape and coords.dtype == frozen.dtype
        if same and not tracing:
            same = bool(torch.equal(coords.detach(), frozen.to(coords.device)))
    if not same:
        raise ValueError(
            f"{name} is frozen for {describe(frozen)}, got {describe(coords)}: freeze for these coordinates "
            "(liere.freeze) or unfreeze (liere.unfreeze)"
        )


def describe(coords: object) -> str:
    """``coords`` for an error message: the ``Grid``, or the tensor's shape and dtype."""
    if isinstance(coords, Tensor):
        return f"coordinates of shape {tuple(coords.shape)} ({coords.dtype})"
    return repr(coords)
