"""RoPE in a learned orthogonal basis: ``R(p) = Q blockdiag(rot(sum_a p_a w_aj)) Q^T``.

In 1D this is what LieRE reduces to (all ``exp(p A)`` share the eigenvectors of ``A``):
``RoPEBasis.from_liere`` converts a 1D LieRE exactly. With several axes it is Cayley-STRING
(``liere.string_pe.CayleySTRING``): the generators ``Q diag(w_a) Q^T`` commute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liere.encoding import LearnedEncoding, PositionEncoding
from liere.linalg import block_diag, num_skew_params, skew_from_params, solve_unpivoted
from liere.rope import initial_mixed_frequencies, mixed_width
from liere.rotations import Rotations


def cayley(S: Tensor) -> Tensor:
    """Cayley transform ``(I - S)(I + S)^-1 = (I + S)^-1 (I - S)`` of skew ``S`` ``(..., r, r)``: orthogonal.
    Under ``torch.export`` (and so ONNX export) the solve is unrolled elimination (``solve_unpivoted``)."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    solve = solve_unpivoted if torch.compiler.is_exporting() else torch.linalg.solve
    return solve(eye + S, eye - S)


def pair_generators(freqs: Tensor) -> Tensor:
    """Skew matrices ``(..., 2 * pairs, 2 * pairs)`` with ``[[0, -w], [w, 0]]`` blocks from ``freqs`` ``(..., pairs)``.

    ``exp(p * pair_generators(w))`` is RoPE's ``blockdiag(rot(p * w_j))``.
    """
    return block_diag(skew_from_params(freqs[..., None], 2), 2 * freqs.shape[-1], fill_identity=False)


class RoPEBasis(LearnedEncoding):
    """RoPE with learned frequencies in a learned orthogonal basis (per layer and head).

    ``R(p) = Q blockdiag(rot(sum_a p_a w[a, j])) Q^T`` on the first ``rot_dim`` features (even), with
    ``Q = basis @ cayley(S)``: ``S`` learned skew (``skew``: ``(depth, num_heads, rot_dim (rot_dim-1) / 2)``,
    init 0) and ``basis`` a fixed orthogonal buffer: the identity, or the eigenbasis set by ``from_liere`` (the
    Cayley map alone misses reflections and rotations by pi; ``S = 0`` starts training where ``basis`` is). ``freqs``
    ``(depth, num_heads, num_axes, rot_dim / 2)`` start as RoPE-Mixed's (``mixed_frequencies``): at init
    the encoding equals RoPE (1D) or RoPE-Mixed.
    """

    default_num_axes = 1

    def rot_dim_multiple(self) -> tuple[int, str]:
        return mixed_width(self.num_axes, type(self).__name__)

    def add_parameters(self) -> None:
        lead, r = (self.depth, self.num_heads), self.rot_dim
        self.freqs = nn.Parameter(torch.empty(*lead, self.num_axes, r // 2))
        self.skew = nn.Parameter(torch.empty(*lead, num_skew_params(r)))
        self.register_buffer("basis", torch.empty(*lead, r, r))

    def initial_state(self) -> dict[str, Tensor]:
        """RoPE-Mixed frequencies, ``S = 0`` and the identity ``basis`` (``from_liere`` sets another basis)."""
        return {
            "freqs": initial_mixed_frequencies(self),
            "skew": torch.zeros(self.skew.shape),
            "basis": torch.eye(self.rot_dim).expand(self.depth, self.num_heads, -1, -1).clone(),
        }

    def orthogonal_basis(self, dtype: torch.dtype | None = None) -> Tensor:
        """``Q = basis @ cayley(S)``, shape ``(depth, num_heads, rot_dim, rot_dim)``, in ``dtype`` (default: that of
        the parameters, at least fp32)."""
        dtype = dtype or torch.promote_types(self.skew.dtype, torch.float32)
        return self.basis.to(dtype) @ cayley(skew_from_params(self.skew.to(dtype), self.rot_dim))

    def skew_generators(self) -> Tensor:
        """Commuting generators ``Q pair_generators(w_a) Q^T``, ``(depth, num_heads, num_axes, head_dim, head_dim)``."""
        Q = self.orthogonal_basis()[:, :, None]
        gens = Q @ pair_generators(self.freqs.to(Q)) @ Q.transpose(-1, -2)
        return block_diag(gens.unsqueeze(-3), self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = torch.einsum("sna,dhap->dshnp", coords, self.freqs.to(coords))
        return Rotations.from_angles(angles, self.head_dim, basis=self.orthogonal_basis(coords.dtype))

    @classmethod
    def from_liere(cls, liere: PositionEncoding) -> RoPEBasis:
        """A ``RoPEBasis`` with exactly the rotations of the 1D encoding ``liere`` (a ``LieRE``, or anything with
        ``skew_generators()``).

        Each generator ``A`` (``head_dim x head_dim``, block-diagonal skew) is brought to real Schur form
        ``A = Z T Z^T`` (scipy, fp64): ``T`` holds 2x2 blocks ``[[0, -w], [w, 0]]`` and, for odd blocks or
        pass-through features, zeros. The 2x2 blocks become pairs with frequency ``w``; zero eigenvalues are
        paired with frequency 0. ``Z`` (columns reordered accordingly) becomes the ``basis``; ``S = 0``. The result
        has the generators' device and dtype (convert ``liere`` to fp64 first for an fp64 copy).
        """
        from scipy.linalg import schur

        if liere.num_axes != 1:
            raise ValueError(f"from_liere: liere must be 1D (num_axes=1), got num_axes={liere.num_axes}")
        if liere.head_dim % 2:
            raise ValueError(f"from_liere: liere.head_dim={liere.head_dim} must be even")
        gens = liere.skew_generators().detach()[:, :, 0]  # (depth, heads, d, d)
        depth, heads, d, _ = gens.shape
        out = cls(d, num_axes=1, num_heads=heads, depth=depth).to(gens)
        freqs, basis = torch.zeros(depth, heads, 1, d // 2, dtype=torch.float64), torch.empty(depth, heads, d, d)
        for i in range(depth):
            for h in range(heads):
                T, Z = (torch.from_numpy(m) for m in schur(gens[i, h].cpu().double().numpy(), output="real"))
                order, w = _schur_pairs(T)
                freqs[i, h, 0, : len(w)] = torch.tensor(w, dtype=torch.float64)
                basis[i, h] = Z[:, order]
        with torch.no_grad():
            out.freqs.copy_(freqs)
            out.basis.copy_(basis)
        return out


def _schur_pairs(T: Tensor) -> tuple[list[int], list[float]]:
    """Column order (rotation pairs first, zero-eigenvalue columns last) and pair frequencies of a real Schur
    form ``T`` of a skew matrix (2x2 diagonal blocks are marked by a nonzero subdiagonal entry)."""
    n, i = T.shape[0], 0
    order, zeros, w = [], [], []
    while i < n:
        if i + 1 < n and T[i + 1, i] != 0:
            order += [i, i + 1]
            w.append(float(T[i + 1, i] - T[i, i + 1]) / 2)
            i += 2
        else:
            zeros.append(i)
            i += 1
    return order + zeros, w
