"""STRING (Schenck et al. 2025, arXiv 2502.02562): rotations ``exp(sum_a p_a L_a)`` with commuting skew
generators, hence exactly translation invariant (``R(p)^T R(p') = R(p' - p)``) in any number of axes.

- Cayley-STRING: ``R(p) = P RoPE(p) P^T`` with ``P = (I - S)(I + S)^-1`` learned (``CayleySTRING``).
- Circulant-STRING: ``L_a = C_a - C_a^T`` with ``C_a`` circulant (``CirculantSTRING``); all circulants share
  the Fourier eigenvectors, so ``exp(sum_a p_a L_a)`` is a circulant computed with two FFTs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liere.encoding import LearnedEncoding
from liere.linalg import block_diag
from liere.rope import mixed_frequencies
from liere.rope_basis import RoPEBasis
from liere.rotations import Rotations


class CayleySTRING(RoPEBasis):
    """Cayley-STRING: RoPE-Mixed frequencies in a learned orthogonal basis ``P = cayley(S)``, per layer and head.

    Identical in math and parameters to ``RoPEBasis`` (which it is, with ``num_axes`` defaulting to 2):
    ``S`` dense skew ``rot_dim x rot_dim`` (init 0, so it starts as RoPE-Mixed), ``R(p) = P rot(p) P^T`` kept
    factored (``Rotations`` with a basis: nothing ``rot_dim x rot_dim`` is built per position).
    Use ``num_heads=1`` / ``depth=1`` to share ``P`` and the frequencies.
    """

    default_num_axes = 2


def skew_circulant_row(params: Tensor, r: int) -> Tensor:
    """First row ``l`` ``(..., r)`` of a skew-symmetric circulant from its free entries ``l[1:h+1]`` ``(..., h)``.

    ``h = (r - 1) // 2``; ``l[0] = 0``, ``l[r - m] = -l[m]`` and, for even ``r``, ``l[r / 2] = 0``. The circulant
    is ``L[i, j] = l[(j - i) mod r]``.
    """
    zero = params.new_zeros(*params.shape[:-1], 1)
    middle = [zero] if r % 2 == 0 else []
    return torch.cat([zero, params, *middle, -params.flip(-1)], dim=-1)


def circulant(row: Tensor) -> Tensor:
    """Dense circulant ``(..., r, r)`` with ``C[i, j] = row[(j - i) mod r]``."""
    r = row.shape[-1]
    idx = torch.arange(r, device=row.device)
    return row[..., (idx[None, :] - idx[:, None]) % r]


class CirculantSTRING(LearnedEncoding):
    """Circulant-STRING: ``R(p) = exp(sum_a p_a L_a)``, ``L_a = C_a - C_a^T`` skew circulant, per layer and head.

    Only the skew part of ``C_a`` matters, so the parameters are its free first-row entries:
    ``rows`` ``(depth, num_heads, num_axes, (rot_dim - 1) // 2)``. ``L_a`` has eigenvalues ``i nu_a[k]`` on the
    Fourier modes (``nu_a = -Im fft(l_a)``, linear in ``l_a``), so ``R(p)`` is the circulant with first row
    ``fft(exp(i sum_a p_a nu_a)) / rot_dim`` (real): no matrix exponential. Returned as one dense
    ``rot_dim x rot_dim`` block (any ``rot_dim >= 3``, odd allowed). The constant Fourier mode (and, for even
    ``rot_dim``, the alternating one) has eigenvalue 0: it is never rotated.

    Init: the ``rows`` are solved so that the eigen-frequencies ``nu`` are RoPE-Mixed's (``mixed_frequencies``).
    """

    def add_parameters(self) -> None:
        if self.rot_dim < 3:
            raise ValueError(f"rot_dim must be >= 3 for a skew circulant with free entries, got {self.rot_dim}")
        self.rows = nn.Parameter(torch.empty(self.depth, self.num_heads, self.num_axes, (self.rot_dim - 1) // 2))

    def initial_state(self) -> dict[str, Tensor]:
        gen, h = self.init_generator(self.seed), (self.rot_dim - 1) // 2
        nu = mixed_frequencies(h + h % 2, self.num_axes, self.num_heads, self.depth, self.theta, gen)[..., :h]
        # nu[k] = 2 sum_m l[m] sin(2 pi m k / r) for k, m = 1..h: an invertible (DST) linear map
        k = torch.arange(1, h + 1, dtype=torch.float64)
        dst = 2 * torch.sin(2 * torch.pi * k[:, None] * k[None, :] / self.rot_dim)
        return {"rows": torch.linalg.solve(dst, nu.double().unsqueeze(-1)).squeeze(-1).float()}

    def first_rows(self, dtype: torch.dtype | None = None) -> Tensor:
        """First rows ``l_a`` of the generators, ``(depth, num_heads, num_axes, rot_dim)``, in ``dtype`` (default:
        that of the parameters, at least fp32)."""
        dtype = dtype or torch.promote_types(self.rows.dtype, torch.float32)
        return skew_circulant_row(self.rows.to(dtype), self.rot_dim)

    def eigen_frequencies(self, dtype: torch.dtype | None = None) -> Tensor:
        """``nu`` ``(depth, num_heads, num_axes, rot_dim)``: ``L_a`` has eigenvalue ``i nu_a[k]`` on Fourier mode k."""
        return -torch.fft.fft(self.first_rows(dtype)).imag

    def skew_generators(self) -> Tensor:
        """Dense commuting generators ``(depth, num_heads, num_axes, head_dim, head_dim)``."""
        return block_diag(circulant(self.first_rows()).unsqueeze(-3), self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = torch.einsum("sna,dhak->dshnk", coords, self.eigen_frequencies(coords.dtype))
        phases = torch.polar(torch.ones_like(angles), angles)
        row = (torch.fft.fft(phases).real if phases.numel() else angles) / self.rot_dim  # MKL's FFT rejects 0 rows
        return Rotations.from_blocks(circulant(row).unsqueeze(-3), self.head_dim)
