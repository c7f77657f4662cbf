"""VisionLlama RoPE: the fixed axial 2D/3D RoPE baseline of the LieRE paper (Ostmeier et al., arXiv 2406.10322;
after Chu et al., VisionLLaMA, arXiv 2403.00522)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from liere.rope import AxialRoPE
from liere.rotations import Rotations

COORD_CONVENTIONS = ("index", "paper")


class VisionLlamaRoPE(AxialRoPE):
    """Fixed axial RoPE with frequencies ``exp(-4 * linspace(0, 1, F))``, ``F = rot_dim / (2 num_axes)`` pairs per axis.

    As in ``AxialRoPE``, the rotated pairs are split into ``num_axes`` contiguous groups, group ``a`` rotating
    by ``p_a * f_j``; ``rot_dim`` defaults to the largest multiple of ``2 num_axes`` <= ``head_dim`` (e.g. 60 of
    64 features for 3 axes; the rest pass through). No parameters. ``coord_convention``:

    - ``"index"`` (default): coordinates are used as given (integer patch indices from ``grid_coords``).
    - ``"paper"``: each axis of the given coordinates is squeezed to ``[0, 1]`` (``(p - min) / (max - min)``
      over the positions, per sample), which is the official LieRE code's ``linspace(0, 1)`` per axis at any
      resolution; the largest angle is then 1 rad. For ``[0, 1]`` at the training resolution only (larger test
      grids extend beyond 1), use ``"index"`` with ``grid_coords(..., spacing=[1 / (n - 1) for n in train_shape])``.
    """

    stored_settings = (*AxialRoPE.stored_settings, "coord_convention")

    def __init__(
        self, head_dim: int, num_axes: int = 2, coord_convention: str = "index", rot_dim: int | None = None
    ) -> None:
        if coord_convention not in COORD_CONVENTIONS:
            raise ValueError(f"coord_convention must be one of {COORD_CONVENTIONS}, got {coord_convention!r}")
        super().__init__(head_dim=head_dim, num_axes=num_axes, theta=math.exp(4), rot_dim=rot_dim)
        self.coord_convention = coord_convention

    def initial_state(self) -> dict[str, Tensor]:
        return {"freqs": torch.exp(-4 * torch.linspace(0, 1, self.rot_dim // (2 * self.num_axes)))}

    def rotations(self, coords: Tensor) -> Rotations:
        if self.coord_convention == "paper":
            lo, hi = coords.amin(dim=1, keepdim=True), coords.amax(dim=1, keepdim=True)
            coords = (coords - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        return super().rotations(coords)
