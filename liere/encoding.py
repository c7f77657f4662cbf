"""The interface shared by every position encoding: ``forward(coords) -> Rotations``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liere.coords import check_coords
from liere.rotations import Rotations


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_rot_dim(head_dim: int, rot_dim: int | None, multiple: int, why: str) -> int:
    """Rotated width: ``rot_dim`` (default ``head_dim``), checked to be <= head_dim and divisible by ``multiple``."""
    check_positive_int(head_dim, "head_dim")
    rot = head_dim if rot_dim is None else check_positive_int(rot_dim, "rot_dim")
    if rot > head_dim:
        raise ValueError(f"rot_dim={rot} exceeds head_dim={head_dim}")
    if rot % multiple:
        name = "head_dim" if rot_dim is None else "rot_dim"
        raise ValueError(f"{name}={rot} must be divisible by {multiple} ({why})")
    return rot


def check_block_size(block_size: object) -> int:
    """Return ``block_size`` if it is an int >= 2, else raise."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    return block_size


def default_theta(num_axes: int) -> float:
    """10000 for 1D token indices (RoPE), 10 for 2D/3D patch grids (rope-vit's RoPE-Mixed)."""
    return 10000.0 if num_axes == 1 else 10.0


class PositionEncoding(nn.Module):
    """Base class: maps coordinates ``(n, num_axes)`` or ``(batch, n, num_axes)`` to ``Rotations``.

    Rotary encodings override ``rotations``; additive ones (absolute embeddings) override
    ``add_to_tokens`` and return identity rotations, so a model handles every encoding with one code path:

        x = pe.add_to_tokens(x, coords)               # (batch, n, dim): adds absolute embeddings, if any
        rot = pe(coords, num_prefix_tokens=1)        # identity for the CLS token
        q, k = rot.for_layer(i).apply(q), rot.for_layer(i).apply(k)
    """

    def __init__(self, head_dim: int, num_axes: int, depth: int = 1) -> None:
        super().__init__()
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.num_axes = check_positive_int(num_axes, "num_axes")
        self.depth = check_positive_int(depth, "depth")

    def forward(self, coords: Tensor, num_prefix_tokens: int = 0) -> Rotations:
        """Rotations for ``coords``; the first ``num_prefix_tokens`` positions (CLS, registers) stay unrotated.

        All frequency/generator math runs in fp32 (or fp64 for fp64 coords) with autocast disabled.
        """
        coords = check_coords(coords, self.num_axes)
        coords = coords.to(torch.promote_types(coords.dtype, torch.float32))
        with torch.autocast(device_type=coords.device.type, enabled=False):
            rot = self.rotations(coords)
        return rot.with_prefix(num_prefix_tokens)

    def rotations(self, coords: Tensor) -> Rotations:
        """Rotations for validated coords ``(S, n, num_axes)``; the identity unless overridden."""
        return Rotations.identity(self.head_dim, coords.shape[1])

    def add_to_tokens(self, x: Tensor, coords: Tensor) -> Tensor:
        """Add an absolute embedding to tokens ``x`` ``(batch, n, dim)`` (prefix tokens excluded); identity here."""
        return x

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (all of an encoding's parameters, as in timm)."""
        return {name for name, _ in self.named_parameters()}


class LearnedEncoding(PositionEncoding):
    """Base of encodings with learned per-layer, per-head parameters (leading dims ``(depth, num_heads)``).

    Validates and stores ``num_heads``, the rotated width ``rot_dim`` (a multiple of ``multiple``) and the
    frequency base ``theta`` (``default_theta`` when None); ``init_generator`` seeds the initialisation.
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int,
        num_heads: int,
        depth: int,
        rot_dim: int | None,
        multiple: int,
        why: str,
        theta: float | None,
    ) -> None:
        super().__init__(head_dim, num_axes, depth)
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, multiple, why)
        self.theta = default_theta(num_axes) if theta is None else float(theta)

    @staticmethod
    def init_generator(seed: int | None) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (None: the global RNG)."""
        return None if seed is None else torch.Generator().manual_seed(seed)
