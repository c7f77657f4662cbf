"""LieRE (Ostmeier et al., ICML 2025): rotations ``exp(sum_a p_a A_a)`` with learned skew generators."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from liere.block_exp import generator_exponentials, resolve_recompute
from liere.coords import Progression
from liere.encoding import LearnedEncoding, check_block_size
from liere.linalg import block_diag, num_skew_params, pair_block_params, skew_from_params
from liere.rope import mixed_frequencies
from liere.rotations import Rotations

INITS = ("rope", "uniform", "normal")


class LieRE(LearnedEncoding):
    """Lie rotational position encoding with block-diagonal skew-symmetric generators.

    Each of ``depth`` layers and ``num_heads`` heads has one generator ``A_a`` per axis: a block-diagonal
    skew matrix with ``rot_dim / block_size`` blocks of size ``block_size`` (features beyond ``rot_dim`` pass
    through). ``R(p) = exp(sum_a p_a A_a)``. ``block_size=2`` is RoPE-Mixed; ``block_size=head_dim`` is
    dense LieRE. Pass ``depth=1`` / ``num_heads=1`` to share generators across layers / heads.

    Parameters: ``generators`` of shape ``(depth, num_heads, num_axes, rot_dim / b, b (b-1) / 2)`` holding
    each block's strictly-lower-triangle entries. Initialisations (``init``):

    - ``"rope"`` (default): every block starts as 2x2 rotations with RoPE-Mixed frequencies
      (``mixed_frequencies`` with ``theta``) on feature pairs and zeros elsewhere, so LieRE starts exactly
      where RoPE-Mixed starts; suited to integer grid coordinates (``grid_coords`` default).
    - ``"uniform"``: the paper's uniform ``[0, 2 pi)`` entries, meant for coordinates in ``[0, 1]``
      (``grid_coords(..., spacing=1/(n-1))``); with integer coordinates norms reach the thousands.
    - ``"normal"``: small-norm ``N(0, init_std^2)`` entries.

    Speed and memory (``block_size >= 3``): for 1D coordinates known to be evenly spaced (a 1D ``Grid``, also
    compiled; or a coordinates tensor found evenly spaced by the per-call validation, eager only) the rotations
    are powers of one exponential per generator (``skew_expm_progression``), about 20x fewer matmuls than one
    exponential per position. With
    ``recompute=True`` the rotations are recomputed in the backward instead of keeping their intermediates
    for it (``torch.utils.checkpoint``; ~20 per matrix for ``skew_expm``, ~1 for powers): more rotation time for
    a fraction of its memory. The default (``None``) recomputes from ``block_size=16`` up (BENCHMARKS.md measures
    the saved activations).
    """

    stored_settings = (*LearnedEncoding.stored_settings, "block_size")

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        num_heads: int = 1,
        depth: int = 1,
        block_size: int = 8,
        rot_dim: int | None = None,
        init: str = "rope",
        theta: float | None = None,
        init_std: float = 0.02,
        method: str = "auto",
        recompute: bool | None = None,
        seed: int | None = None,
    ) -> None:
        self.block_size = check_block_size(block_size)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init, self.init_std, self.method = init, init_std, method
        self.recompute = resolve_recompute(recompute, block_size)
        self.uses_progression = block_size >= 3  # 1D grids: powers of one exponential
        super().__init__(head_dim, num_axes, num_heads, depth, theta, rot_dim, seed)

    def add_parameters(self) -> None:
        num_blocks, m = self.rot_dim // self.block_size, num_skew_params(self.block_size)
        self.generators = nn.Parameter(torch.empty(self.depth, self.num_heads, self.num_axes, num_blocks, m))
        if self.init == "rope":
            self._check_rope_init()

    def initial_state(self) -> dict[str, Tensor]:
        shape, gen = self.generators.shape, self.init_generator(self.seed)
        if self.init == "uniform":
            return {"generators": torch.rand(shape, generator=gen) * 2 * math.pi}
        if self.init == "normal":
            return {"generators": torch.randn(shape, generator=gen) * self.init_std}
        return {"generators": self._rope_init(shape, gen)}

    def _check_rope_init(self) -> None:
        """init='rope' over several axes needs an even number of feature pairs (two halves of mixed frequencies)."""
        b, num_blocks = self.block_size, self.rot_dim // self.block_size
        if self.num_axes > 1 and num_blocks * (b // 2) % 2:
            width = f"rot_dim={self.rot_dim}" if self.rot_dim != self.head_dim else f"head_dim={self.head_dim}"
            raise ValueError(
                f"init='rope' over {self.num_axes} axes needs an even number of feature pairs, but {width} in blocks "
                f"of block_size={b} holds {num_blocks * (b // 2)}; change head_dim/block_size or use init='normal'"
            )

    def _rope_init(self, shape: tuple[int, ...], gen: torch.Generator | None) -> Tensor:
        """Put RoPE-Mixed frequencies on the ``(2k+1, 2k)`` entries of each block, zeros elsewhere.

        Pairs are numbered along the rotated width as in RoPE-Mixed (an odd block's last feature has none).
        """
        depth, heads, axes, num_blocks, _ = shape
        b = self.block_size
        pairs_per_block = b // 2
        freqs = mixed_frequencies(num_blocks * pairs_per_block, axes, heads, depth, self.theta, gen)
        return pair_block_params(freqs.unflatten(-1, (num_blocks, pairs_per_block)), b)

    def generator_blocks(self) -> Tensor:
        """Skew blocks ``(depth, num_heads, num_axes, rot_dim / b, b, b)``."""
        return skew_from_params(self.generators, self.block_size)

    def skew_generators(self) -> Tensor:
        """Dense generators ``(depth, num_heads, num_axes, head_dim, head_dim)``: skew, block-diagonal."""
        return block_diag(self.generator_blocks(), self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor, progression: Progression | None = None) -> Rotations:
        params = self.generators.to(coords)
        if self.block_size == 2:
            return Rotations.from_angles(torch.einsum("sna,dhap->dshnp", coords, params[..., 0]), self.head_dim)
        gens = skew_from_params(params, self.block_size)
        blocks = generator_exponentials(coords, gens, self.method, self.recompute, progression)
        return Rotations.from_blocks(blocks, self.head_dim)
