"""The RoPE family: 1D RoPE, axial RoPE for 2D/3D grids and RoPE-Mixed (learned mixed frequencies)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from liere.encoding import LearnedEncoding, PositionEncoding, resolve_rot_dim
from liere.linalg import block_diag, skew_from_params
from liere.rotations import Rotations


def rope_frequencies(rot_dim: int, theta: float, step: int = 2) -> Tensor:
    """``1 / theta ** (arange(0, rot_dim, step) / rot_dim)`` in fp32, as rotary-embedding-torch computes it."""
    return 1.0 / (theta ** (torch.arange(0, rot_dim, step)[: rot_dim // step].float() / rot_dim))


def pair_rotations(angles: Tensor, head_dim: int) -> Rotations:
    """Rotations from angles ``(depth, S, H, n, pairs)`` of the feature pairs ``(2j, 2j+1)``."""
    return Rotations(head_dim, cos=angles.cos(), sin=angles.sin())


def mixed_frequencies(
    num_pairs: int, num_axes: int, num_heads: int, depth: int, theta: float, generator: torch.Generator | None = None
) -> Tensor:
    """Initial RoPE-Mixed frequencies, shape ``(depth, num_heads, num_axes, num_pairs)``.

    1 axis: RoPE's ``theta ** (-2j / rot_dim)``. 2 axes: naver-ai/rope-vit's ``init_random_2d_freqs``
    (magnitudes ``theta ** (-4j / rot_dim)`` for each half of the pairs, directions ``phi`` and
    ``phi + pi/2`` with ``phi`` uniform per layer and head). 3+ axes: the same magnitudes along random
    unit directions per layer, head and pair.
    """
    rot_dim = 2 * num_pairs
    if num_axes == 1:
        return rope_frequencies(rot_dim, theta).expand(depth, num_heads, 1, num_pairs).clone()
    if num_pairs % 2:
        raise ValueError(f"rot_dim={rot_dim} must be divisible by 4 for mixed frequencies over {num_axes} axes")
    mag = rope_frequencies(rot_dim, theta, step=4).repeat(2)  # (pairs,)
    if num_axes == 2:
        phi = torch.rand(depth, num_heads, 1, generator=generator) * 2 * math.pi
        half = torch.zeros(num_pairs)
        half[num_pairs // 2 :] = math.pi / 2
        angle = phi + half  # (depth, heads, pairs)
        direction = torch.stack([angle.cos(), angle.sin()], dim=2)
    else:
        direction = torch.randn(depth, num_heads, num_axes, num_pairs, generator=generator)
        direction = direction / direction.norm(dim=2, keepdim=True)
    return direction * mag


class RoPE(PositionEncoding):
    """Rotary position embedding (Su et al.) for 1D positions, identical to rotary-embedding-torch.

    Pair ``j`` = features ``(2j, 2j+1)`` rotates by ``p * theta ** (-2j / rot_dim)``; features beyond
    ``rot_dim`` pass through. No parameters.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, rot_dim: int | None = None) -> None:
        super().__init__(head_dim, num_axes=1)
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, 2, "RoPE rotates feature pairs")
        self.theta = float(theta)
        self.register_buffer("freqs", rope_frequencies(self.rot_dim, self.theta), persistent=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = coords[..., 0, None] * self.freqs.to(coords)  # (S, n, pairs)
        return pair_rotations(angles[None, :, None], self.head_dim)


class AxialRoPE(PositionEncoding):
    """Axial RoPE for 2D/3D grids (rope-vit's ``compute_axial_cis``, VisionLlama-style).

    The rotated pairs are split into ``num_axes`` contiguous groups; group ``a`` rotates by
    ``p_a * theta ** (-2 * num_axes * j / rot_dim)``. ``rot_dim`` defaults to the largest multiple of
    ``2 num_axes`` <= ``head_dim`` (e.g. 60 of 64 features for 3 axes; the rest pass through). No parameters.
    """

    def __init__(self, head_dim: int, num_axes: int = 2, theta: float = 100.0, rot_dim: int | None = None) -> None:
        super().__init__(head_dim, num_axes)
        if rot_dim is None:
            rot_dim = head_dim - head_dim % (2 * num_axes)
            if rot_dim == 0:
                raise ValueError(f"head_dim={head_dim} is too small: each of the {num_axes} axes needs a feature pair")
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, 2 * num_axes, f"each of the {num_axes} axes rotates pairs")
        self.theta = float(theta)
        freqs = rope_frequencies(self.rot_dim, self.theta, step=2 * num_axes)  # (pairs per axis,)
        self.register_buffer("freqs", freqs, persistent=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = (coords[..., :, None] * self.freqs.to(coords)).flatten(-2)  # (S, n, axes * pairs per axis)
        return pair_rotations(angles[None, :, None], self.head_dim)


class RoPEMixed(LearnedEncoding):
    """RoPE-Mixed (Heo et al. 2024): learned per-layer, per-head frequencies mixing all axes.

    Pair ``j`` rotates by ``sum_a p_a f[layer, head, a, j]``; ``f`` is initialised by ``mixed_frequencies``.
    Equals LieRE with block size 2.
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        num_heads: int = 1,
        depth: int = 1,
        theta: float | None = None,
        rot_dim: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(head_dim, num_axes, num_heads, depth, rot_dim, 2, "RoPE-Mixed rotates feature pairs", theta)
        gen = self.init_generator(seed)
        init = mixed_frequencies(self.rot_dim // 2, num_axes, num_heads, depth, self.theta, gen)
        self.freqs = nn.Parameter(init)  # (depth, heads, axes, pairs)

    def skew_generators(self) -> Tensor:
        """Dense commuting generators ``(depth, num_heads, num_axes, head_dim, head_dim)``: ``[[0, -w], [w, 0]]``."""
        pairs = skew_from_params(self.freqs[..., None], 2)
        return block_diag(pairs, self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = torch.einsum("sna,dhap->dshnp", coords, self.freqs.to(coords))
        return pair_rotations(angles, self.head_dim)
