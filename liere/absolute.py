"""Additive encodings: no encoding, learned absolute embeddings and fixed sin-cos embeddings.

They leave queries and keys unrotated (``forward`` returns identity ``Rotations``) and instead add an
embedding to the tokens through ``add_to_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Proxy

from liere.coords import Grid
from liere.encoding import PositionEncoding, check_positive_float, check_positive_int
from liere.fx import traced_add_to_tokens


def _check_tokens(x: Tensor, coords: Tensor, dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be (batch, n, dim={dim}), got {tuple(x.shape)}")
    if coords.shape[1] != x.shape[1] or coords.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"coords {tuple(coords.shape)} do not match tokens x {tuple(x.shape)}: expected n={x.shape[1]} "
            f"positions shared or per sample (prefix tokens are not part of x here)"
        )


class NoPE(PositionEncoding):
    """No position information at all (the permutation-equivariant baseline)."""


class LearnedAbsolute(PositionEncoding):
    """Learned absolute embedding table over a grid of ``grid_shape`` positions, added to the tokens.

    Coordinates index the table (integer coordinates hit entries exactly); fractional coordinates are
    interpolated (linear/bilinear/trilinear) and coordinates outside the table are clamped to its border,
    which is how such a model meets larger test grids.
    """

    stored_settings = (*PositionEncoding.stored_settings, "dim", "grid_shape")

    def __init__(self, dim: int, grid_shape: Sequence[int], head_dim: int, init_std: float = 0.02) -> None:
        grid_shape = tuple(grid_shape) if isinstance(grid_shape, Sequence) else ()
        if not grid_shape or not all(isinstance(s, int) and s >= 1 for s in grid_shape) or len(grid_shape) > 3:
            raise ValueError(f"grid_shape must be 1 to 3 positive ints, got {grid_shape!r}")
        super().__init__(head_dim=head_dim, num_axes=len(grid_shape))
        self.dim = check_positive_int(dim, "dim")
        self.grid_shape, self.init_std = grid_shape, init_std
        self.table = nn.Parameter(torch.empty(1, dim, *grid_shape))
        self.reset_parameters()

    def initial_state(self) -> dict[str, Tensor]:
        return {"table": torch.randn(self.table.shape) * self.init_std}

    def add_to_tokens(self, x: Tensor, coords: Tensor | Grid) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: this call as one node
            return traced_add_to_tokens(self, x, coords)
        coords = self.resolve(coords, like=x)[0].float()
        _check_tokens(x, coords, self.dim)
        table, sizes = self.table, list(self.grid_shape)
        if self.num_axes == 1:  # grid_sample needs 2-D: add a dummy axis of size 1 at coordinate 0
            table, sizes = table.unsqueeze(2), [1, *sizes]
            coords = torch.cat([torch.zeros_like(coords), coords], dim=-1)
        size = torch.tensor(sizes, dtype=coords.dtype, device=coords.device)
        grid = 2 * coords / (size - 1).clamp(min=1) - 1  # align_corners=True: index 0 -> -1, size-1 -> +1
        grid = grid.flip(-1)  # grid_sample wants (x=last axis, y, z)
        grid = grid.reshape(grid.shape[0], *([1] * (len(sizes) - 1)), grid.shape[1], len(sizes))
        table = table.expand(grid.shape[0], *table.shape[1:]).to(x.dtype)
        emb = F.grid_sample(table, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)
        return x + emb.flatten(2).transpose(1, 2)


def sincos_embedding(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sin-cos embedding ``(S, n, dim)`` of coords ``(S, n, num_axes)`` (MAE / timm convention).

    Each axis gets ``dim / num_axes`` features: ``sin(p * w_k)`` then ``cos(p * w_k)`` with
    ``w_k = temperature ** (-k / (dim / (2 num_axes)))``.
    """
    num_axes = coords.shape[-1]
    per_axis = dim // (2 * num_axes)
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=coords.dtype, device=coords.device) / per_axis)
    angles = coords[..., None] * omega  # (S, n, axes, per_axis)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class SinCosAbsolute(PositionEncoding):
    """Fixed 1D/2D/3D sin-cos absolute embedding added to the tokens; works for any float coordinates."""

    stored_settings = (*PositionEncoding.stored_settings, "dim", "temperature")

    def __init__(self, dim: int, num_axes: int, head_dim: int, temperature: float = 10000.0) -> None:
        super().__init__(head_dim=head_dim, num_axes=num_axes)
        self.dim = check_positive_int(dim, "dim")
        if dim % (2 * num_axes):
            raise ValueError(f"dim={dim} must be divisible by 2 * num_axes = {2 * num_axes} for sin-cos embeddings")
        self.temperature = check_positive_float(temperature, "temperature")

    def add_to_tokens(self, x: Tensor, coords: Tensor | Grid) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: this call as one node
            return traced_add_to_tokens(self, x, coords)
        coords = self.resolve(coords, like=x)[0].float()
        _check_tokens(x, coords, self.dim)
        return x + sincos_embedding(coords, self.dim, self.temperature).to(x.dtype)
