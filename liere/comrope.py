"""ComRoPE (Yu et al., CVPR 2025): LieRE-style block-diagonal skew generators constrained to commute, so
``R(p) = exp(sum_a p_a A_a)`` is exactly translation invariant.

- ``"ap"`` (axis-partition): block ``j`` belongs to axis ``j mod num_axes``; every other axis' generator is
  zero there, so generators of different axes act on different blocks.
- ``"ld"`` (linearly dependent): block ``j`` of every axis' generator is a multiple ``theta[a, j] S_j`` of one
  shared skew ``S_j``; block ``j`` of ``R(p)`` is ``exp(t_j S_j)`` with ``t_j = sum_a p_a theta[a, j]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liere.block_exp import generator_exponentials, resolve_recompute
from liere.coords import Progression
from liere.encoding import LearnedEncoding, check_block_size
from liere.linalg import block_diag, num_skew_params, pair_block_params, skew_from_params
from liere.rope import rope_frequencies
from liere.rotations import Rotations

VARIANTS = ("ap", "ld")


class ComRoPE(LearnedEncoding):
    """ComRoPE with ``block_size`` x ``block_size`` commuting skew blocks per layer and head.

    Parameters: ``blocks`` ``(depth, num_heads, rot_dim / b, b (b-1) / 2)`` (strictly-lower-triangle entries of
    each block's skew matrix) and, for ``variant="ld"``, ``scales`` ``(depth, num_heads, num_axes, rot_dim / b)``
    (one scalar per axis and block: with one scalar per axis for all blocks, ``R(p)`` would only see the single
    projection ``sum_a p_a theta_a`` of the position). Init: each block starts as 2x2 rotations with RoPE
    frequencies ``theta ** (-2j / rot_dim)`` on its feature pairs; LD scales start as random unit directions
    per block, so at init ``"ap"`` is an axial RoPE and ``"ld"`` a RoPE-Mixed. ``method`` and ``recompute``
    as in ``LieRE`` (1D positions take the powers path there too).
    """

    uses_progression = True  # 1D grids: powers of one exponential
    stored_settings = (*LearnedEncoding.stored_settings, "variant", "block_size")

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        num_heads: int = 1,
        depth: int = 1,
        variant: str = "ap",
        block_size: int = 8,
        rot_dim: int | None = None,
        theta: float | None = None,
        method: str = "auto",
        recompute: bool | None = None,
        seed: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.block_size, self.method = variant, check_block_size(block_size), method
        self.recompute = resolve_recompute(recompute, block_size)
        super().__init__(head_dim, num_axes, num_heads, depth, theta, rot_dim, seed)

    def add_parameters(self) -> None:
        num_blocks, lead = self.rot_dim // self.block_size, (self.depth, self.num_heads)
        if self.variant == "ap" and num_blocks < self.num_axes:
            raise ValueError(f"variant 'ap' needs at least num_axes={self.num_axes} blocks, got {num_blocks}")
        self.blocks = nn.Parameter(torch.empty(*lead, num_blocks, num_skew_params(self.block_size)))
        if self.variant == "ld":
            self.scales = nn.Parameter(torch.empty(*lead, self.num_axes, num_blocks))
        else:
            self.register_buffer("axis_of_block", torch.empty(num_blocks, dtype=torch.long), persistent=False)

    def initial_state(self) -> dict[str, Tensor]:
        b, num_blocks = self.block_size, self.rot_dim // self.block_size
        freqs = rope_frequencies(2 * num_blocks * (b // 2), self.theta).reshape(num_blocks, -1)
        state = {"blocks": pair_block_params(freqs, b).expand(self.depth, self.num_heads, -1, -1).clone()}
        if self.variant == "ap":
            return state | {"axis_of_block": torch.arange(num_blocks) % self.num_axes}
        gen = self.init_generator(self.seed)
        direction = torch.randn(self.depth, self.num_heads, self.num_axes, num_blocks, generator=gen)
        return state | {"scales": direction / direction.norm(dim=2, keepdim=True)}

    def _axis_weights(self, dtype: torch.dtype) -> Tensor:
        """Weight of axis ``a`` in block ``j``'s generator, ``(depth | 1, num_heads | 1, num_axes, num_blocks)``."""
        if self.variant == "ld":
            return self.scales.to(dtype)
        one_hot = torch.arange(self.num_axes, device=self.axis_of_block.device)[:, None] == self.axis_of_block
        return one_hot.to(dtype)[None, None]

    def skew_generators(self) -> Tensor:
        """Commuting generators ``(depth, num_heads, num_axes, head_dim, head_dim)``: skew, block-diagonal."""
        S = skew_from_params(self.blocks, self.block_size)[:, :, None]  # (depth, heads, 1, nb, b, b)
        gens = self._axis_weights(S.dtype)[..., None, None] * S
        return block_diag(gens, self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor, progression: Progression | None = None) -> Rotations:
        S = skew_from_params(self.blocks.to(coords), self.block_size)[:, :, None]  # (depth, heads, 1, nb, b, b)
        gens = self._axis_weights(coords.dtype)[..., None, None] * S  # (depth, heads, axes, nb, b, b)
        blocks = generator_exponentials(coords, gens, self.method, self.recompute, progression)
        return Rotations.from_blocks(blocks, self.head_dim)
