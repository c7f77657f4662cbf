"""The interface shared by every position encoding: ``forward(coords or Grid) -> Rotations``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from liere.cache import CachedRotationsMixin, cache_repr, cached_rotations
from liere.coords import Grid, Progression, resolve_coords
from liere.frozen import describe, frozen_rotations, frozen_state, refreeze, restamp
from liere.fx import is_symbolic_tracing, traced_rotations
from liere.precision import build_dtype, building
from liere.rotations import Rotations
from liere.settings import check_settings, forgive_missing_settings, settings_tensor

# Constructor arguments that define an encoding's shape, in the order ``extra_repr`` prints those it has.
REPR_FIELDS = (
    "dim", "head_dim", "num_axes", "num_heads", "depth", "block_size", "rot_dim", "variant", "grid_shape", "init",
    "theta", "temperature", "coord_convention", "method", "recompute",
)  # fmt: skip


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_float(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0 (a frequency base), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_num_prefix_tokens(value: object) -> int:
    """Return ``value`` if it is an int >= 0, else raise naming ``num_prefix_tokens``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"num_prefix_tokens must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {value!r}")
    return value


def resolve_rot_dim(head_dim: int, rot_dim: int | None, multiple: int, why: str) -> int:
    """Rotated width: ``rot_dim`` (default ``head_dim``), checked to be <= head_dim and divisible by ``multiple``;
    errors name the argument the user gave (``head_dim`` when ``rot_dim`` is None)."""
    check_positive_int(head_dim, "head_dim")
    rot = head_dim if rot_dim is None else check_positive_int(rot_dim, "rot_dim")
    if rot > head_dim:
        raise ValueError(f"rot_dim={rot} exceeds head_dim={head_dim}")
    if rot % multiple:
        name = "head_dim" if rot_dim is None else "rot_dim"
        raise ValueError(f"{name}={rot} must be divisible by {multiple}" + (f" ({why})" if why else ""))
    return rot


def check_block_size(block_size: object) -> int:
    """Return ``block_size`` if it is an int >= 2, else raise."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    return block_size


def fixed_at_construction(name: str) -> property:
    """An attribute set once by the constructor; assigning it later raises (what it sets was computed from it)."""
    key = "_" + name

    def get(self: nn.Module) -> object:
        return self.__dict__[key] if key in self.__dict__ else self.__dict__[name]  # modules pickled before

    def set_once(self: nn.Module, value: object) -> None:
        if key in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}.{name} is fixed at construction (what it sets is computed then); "
                f"build a new {type(self).__name__} with {name}={value!r}"
            )
        self.__dict__[key] = value

    return property(get, set_once, doc=f"``{name}``, fixed at construction.")


def copy_initial(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)`` for a plain tensor or a sharded ``DTensor`` (each rank keeps its own shard)."""
    if type(target).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def default_theta(num_axes: int) -> float:
    """10000 for 1D token indices (RoPE), 10 for 2D/3D patch grids (rope-vit's RoPE-Mixed)."""
    return 10000.0 if num_axes == 1 else 10.0


class PositionEncoding(CachedRotationsMixin, nn.Module):
    """Base class: maps coordinates ``(n, num_axes)``, ``(batch, n, num_axes)`` or a ``Grid`` to ``Rotations``.

    Rotary encodings override ``rotations``; additive ones (absolute embeddings) override
    ``add_to_tokens`` and return identity rotations, so a model handles every encoding with one code path:

        x = pe.add_to_tokens(x, grid)                 # (batch, n, dim): adds absolute embeddings, if any
        rot = pe(grid, num_prefix_tokens=1)          # identity for the CLS token
        q, k = rot.for_layer(i).apply(q), rot.for_layer(i).apply(k)

    Encodings with a faster path for evenly spaced 1D positions set ``uses_progression``; their ``rotations``
    then also receives ``progression=(start, step)`` when it is known: always for a 1D ``Grid`` (no device
    sync), and for a 1D coordinates tensor when the per-call validation finds it evenly spaced (eager only).
    Buffers named in ``fp32_buffers`` (fixed frequency tables) keep their dtype when the module is cast
    (``model.to(torch.bfloat16)``): only their device follows. Outside training the rotations are computed once
    and cached (``liere.cache``: ``cache_size``, ``clear_cache()``, ``cache_nbytes``).

    Initial values come from ``initial_state()`` (every parameter and buffer, computed on the CPU) through
    ``reset_parameters()``, which construction calls: an encoding built under ``torch.device("meta")`` allocates
    nothing and draws no random numbers; after ``to_empty(device=...)``, ``reset_parameters()`` gives it the values
    a normal construction gives under the same seed (the FSDP recipe: build on meta, shard, ``to_empty``, init).
    """

    uses_progression: ClassVar[bool] = False
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    stored_settings: ClassVar[tuple[str, ...]] = ("head_dim", "num_axes")  # saved and checked (liere.settings)

    def __init__(self, *, head_dim: int, num_axes: int, depth: int = 1) -> None:
        super().__init__()
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.num_axes = check_positive_int(num_axes, "num_axes")
        self.depth = check_positive_int(depth, "depth")

    def forward(self, coords: Tensor | Grid, num_prefix_tokens: int = 0) -> Rotations:
        """Rotations for ``coords``; the first ``num_prefix_tokens`` positions (CLS, registers) stay unrotated.

        A tensor is validated on every call (shape, dtype, finite values: one device sync, skipped under
        tracing); a ``Grid`` needs no validation of values. All frequency/generator math runs in fp32 (or fp64
        for fp64 coords) with autocast disabled (``liere.precision``). Returned from the cache when no gradient
        can flow through the result (``liere.cache``); treat the result as read-only.
        """
        num_prefix_tokens = check_num_prefix_tokens(num_prefix_tokens)
        if is_symbolic_tracing():  # torch.fx: this call as one node (liere.fx)
            return traced_rotations(self, coords, num_prefix_tokens)
        if frozen_state(self) is not None:  # liere.freeze: constants
            return frozen_rotations(self, coords, num_prefix_tokens)
        return cached_rotations(self, coords, num_prefix_tokens, self.build_rotations)  # liere.cache

    def build_rotations(self, coords: Tensor | Grid, num_prefix_tokens: int = 0) -> Rotations:
        """``forward`` without the cache: validate ``coords`` and compute the rotations."""
        values, progression = self.resolve(coords, detect_progression=self.uses_progression)
        with building(values.device.type):
            rot = self.rotations(values) if progression is None else self.rotations(values, progression=progression)
        return rot.with_prefix(num_prefix_tokens)

    def resolve(
        self, coords: Tensor | Grid, detect_progression: bool = False, like: Tensor | None = None
    ) -> tuple[Tensor, Progression | None]:
        """Validated coordinates ``(S, n, num_axes)`` in at least fp32 and their 1D progression (if asked and known).

        A ``Grid`` is built on ``like``'s device (default: that of the encoding's parameters or buffers, else
        the CPU), in fp32 or, for an fp64 encoding, fp64.
        """
        if like is None:
            like = next(iter(self.parameters()), None)
        if like is None:
            like = next(iter(self.buffers()), torch.zeros(()))
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        values, progression = resolve_coords(coords, self.num_axes, like.device, dtype, detect_progression)
        return values.to(build_dtype(values.dtype)), progression

    def rotations(self, coords: Tensor, progression: Progression | None = None) -> Rotations:
        """Rotations for validated coords ``(S, n, num_axes)``; the identity unless overridden."""
        return Rotations.identity(self.head_dim, coords.shape[1])

    def add_to_tokens(self, x: Tensor, coords: Tensor | Grid) -> Tensor:
        """Add an absolute embedding to tokens ``x`` ``(batch, n, dim)`` (prefix tokens excluded); identity here."""
        return x

    def get_extra_state(self) -> Tensor:
        """The defining settings, stored in the state dict beside the weights (``liere.settings``)."""
        return settings_tensor(self)

    def set_extra_state(self, state: Tensor) -> None:
        """Raise if a loaded state dict's settings differ from this encoding's (``liere.settings``)."""
        check_settings(self, state)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, object],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """``nn.Module``'s, except that a state dict without settings (saved before they were stored) loads."""
        args = (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, *args)
        forgive_missing_settings(prefix, missing_keys)
        refreeze(self)  # frozen rotations follow the loaded weights (liere.frozen)

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickling and ``deepcopy``: a frozen encoding's copy stays frozen (``liere.frozen``)."""
        super().__setstate__(state)
        restamp(self)

    def no_weight_decay(self) -> set[str]:
        """Names of this encoding's parameters, to exclude from weight decay, relative to the encoding
        (``"generators"``); ``liere.no_weight_decay_names(model)`` gives the model-level names timm expects."""
        return {name for name, _ in self.named_parameters()}

    def initial_state(self) -> dict[str, Tensor]:
        """Initial values of every parameter and buffer of this module, by name; called on the CPU (a seeded encoding
        draws from its own generator, others from the global torch RNG). None here: encodings with tensors override.
        """
        return {}

    def reset_parameters(self) -> None:
        """Set every parameter and buffer to ``initial_state()`` in place, on the device (and in the dtype) it lives
        on now; a no-op while they are on ``meta`` (nothing to fill, no random numbers drawn)."""
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        if any(tensor.is_meta for tensor in own.values()):
            return
        with torch.device("cpu"):
            values = self.initial_state()
        if missing := sorted(own.keys() - values.keys()):
            raise NotImplementedError(
                f"{type(self).__name__}.initial_state() does not give {missing}: it must return the initial value of "
                "every parameter and buffer, so the encoding can be initialised after meta-device construction"
            )
        with torch.no_grad():
            for name, value in values.items():
                copy_initial(own[name], value)

    def _fill_derived(self, names: list[str]) -> None:
        """Compute the derived (non-persistent) buffers ``names`` from ``initial_state()``, drawing no random number
        from the global RNG: buffers made real by ``to_empty`` are right without ``reset_parameters()`` (a checkpoint
        load does not hold them)."""
        if not names:
            return
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            values = self.initial_state()
        with torch.no_grad():
            for name in names:
                copy_initial(self._buffers[name], values[name])

    def extra_repr(self) -> str:
        fields = [f"{name}={getattr(self, name)!r}" for name in REPR_FIELDS if hasattr(self, name)]
        held, frozen = self.cache_nbytes, frozen_state(self)
        fields += [cache_repr(held)] if held else []
        return ", ".join(fields + ([f"frozen={describe(frozen.coords)}"] if frozen else []))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PositionEncoding:
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.bfloat16``...), keeping the ``fp32_buffers``' dtype; frozen
        rotations are computed again where (and as) the moved encoding computes them."""
        kept = {name: getattr(self, name) for name in self.fp32_buffers}
        derived = [name for name in self._non_persistent_buffers_set if getattr(self._buffers.get(name), "is_meta", 0)]
        super()._apply(fn, recurse)
        self._fill_derived([name for name in derived if not self._buffers[name].is_meta])
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:  # a cast: keep the exact values, follow the device only
                self._buffers[name] = before.to(device=after.device)
        refreeze(self)
        return self


class LearnedEncoding(PositionEncoding):
    """Base of encodings with learned per-layer, per-head parameters (leading dims ``(depth, num_heads)``), and
    their shared constructor.

    Validates and stores ``num_axes`` (``default_num_axes`` when None), ``num_heads``, the rotated width ``rot_dim``
    (``head_dim`` when None; a multiple of what ``rot_dim_multiple`` says), the frequency base ``theta``
    (``default_theta`` when None; it only sets initial values) and the initialisation ``seed`` (None: the global
    RNG; ``init_generator`` turns it into a generator); then ``add_parameters()`` creates the (empty) tensors and
    ``reset_parameters()`` fills them from ``initial_state()``.
    """

    stored_settings = (*PositionEncoding.stored_settings, "num_heads", "depth", "rot_dim")
    default_num_axes: ClassVar[int] = 2

    def __init__(
        self,
        head_dim: int,
        num_axes: int | None = None,
        num_heads: int = 1,
        depth: int = 1,
        theta: float | None = None,
        rot_dim: int | None = None,
        seed: int | None = None,
    ) -> None:
        num_axes = self.default_num_axes if num_axes is None else num_axes
        super().__init__(head_dim=head_dim, num_axes=num_axes, depth=depth)
        self.seed = seed
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, *self.rot_dim_multiple())
        self.theta = default_theta(num_axes) if theta is None else check_positive_float(theta, "theta")
        self.add_parameters()
        self.reset_parameters()

    def rot_dim_multiple(self) -> tuple[int, str]:
        """What ``rot_dim`` must be a multiple of, and why (for the error message); called with ``num_axes`` set.
        Encodings of ``block_size`` blocks (set before this constructor runs) need whole blocks."""
        block_size = self.__dict__.get("block_size")
        return (1, "") if block_size is None else (block_size, f"block_size={block_size}")

    def add_parameters(self) -> None:
        """Create the parameters and buffers (``torch.empty``: ``reset_parameters`` fills them)."""

    @staticmethod
    def init_generator(seed: int | None) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (None: the global RNG)."""
        return None if seed is None else torch.Generator().manual_seed(seed)
