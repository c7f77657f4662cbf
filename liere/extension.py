"""Context and resolution extension of any rotary encoding by rescaling the spectrum of its generators.

Every rotary encoding in liere is ``R(p) = exp(sum_a p_a A_a)`` with real skew generators ``A_a`` (fixed RoPE and
axial RoPE have diagonal-block ones). A skew matrix is ``A = U diag(-i lambda) U^H`` with real eigenvalue pairs
``± w``: its rotation planes and their frequencies. ``extend`` replaces each ``A_a`` by
``f(A_a) = U diag(-i sign(lambda) f(|lambda|)) U^H``, where ``f`` is a context-extension rule of
``liere.scaling`` (``linear`` = position interpolation, ``dynamic`` NTK, ``yarn``, ``llama3``, ``longrope``): each
plane keeps its orientation and gets the frequency the rule gives its wavelength.

- Fixed RoPE, axial RoPE: the result equals the rule applied to their frequency table (transformers' own numbers).
- Commuting families (RoPE-Mixed, STRING, ComRoPE, rope-basis): the ``f(A_a)`` still commute, and on every axis
  the spectrum is the rule applied to the original spectrum; ``R(p)`` is the product of the per-axis rotations.
- LieRE (non-commuting): each axis alone is extended exactly (``R(t e_a) = exp(t f(A_a))``), and ``linear`` equals
  dividing positions by ``factor`` for every position. For the other rules a point off the axes rotates by
  ``exp(sum_a p_a f(A_a))``, which is not the product of the per-axis extended rotations; the gap is of order
  ``p_a p_b |[f(A_a), f(A_b)]| / 2`` (``separability_gap`` measures it).

``extend`` returns a new encoding (``ExtendedEncoding``); the original is left unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from liere.encoding import PositionEncoding
from liere.linalg import block_diag, skew_from_params
from liere.rope import AxialRoPE, RoPE
from liere.rotations import Rotations
from liere.scaling import check_rope_parameters, rescale_frequencies

RopeParameters = Mapping[str, Any]


def fixed_generators(pe: PositionEncoding) -> tuple[Tensor, int]:
    """Skew generators ``(depth, heads, axes, head_dim, head_dim)`` of a fixed RoPE or axial RoPE and the width
    ``d`` of its frequency base ``theta ** (-2j / d)``."""
    pairs_per_axis = pe.freqs.shape[0]
    freqs = torch.zeros(pe.num_axes, pe.rot_dim // 2, dtype=torch.float64)
    for axis in range(pe.num_axes):
        freqs[axis, axis * pairs_per_axis : (axis + 1) * pairs_per_axis] = pe.freqs.double()
    dense = block_diag(skew_from_params(freqs[..., None], 2), pe.head_dim, fill_identity=False)
    return dense[None, None], 2 * pairs_per_axis


def is_rotary(pe: PositionEncoding) -> bool:
    """Whether ``extend`` applies to ``pe``: fixed RoPE, axial RoPE, or an encoding with skew generators."""
    return isinstance(pe, (RoPE, AxialRoPE)) or hasattr(pe, "skew_generators")


def generators_and_width(pe: PositionEncoding) -> tuple[Tensor, int]:
    """``pe``'s skew generators ``(depth, heads, axes, head_dim, head_dim)`` in fp64 and the width ``d`` its
    frequencies are measured against (``theta ** (-2j / d)``: ``rot_dim``, ``rot_dim / 2`` for RoPE-Mixed's
    two halves on several axes, ``rot_dim / axes`` for axial RoPE)."""
    if isinstance(pe, (RoPE, AxialRoPE)):
        return fixed_generators(pe)
    if not is_rotary(pe):
        raise ValueError(
            f"extend: {type(pe).__name__} is not a rotary encoding (it has no skew generators); extension rescales "
            "rotation frequencies"
        )
    with torch.no_grad():
        gens = pe.skew_generators().detach().double().cpu()
    width = pe.rot_dim // 2 if type(pe).__name__ == "RoPEMixed" and pe.num_axes > 1 else pe.rot_dim
    return gens, width


def rescale_generators(
    gens: Tensor, rope_parameters: RopeParameters, *, dim: int, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """``(f(A), attention factor)`` for skew ``gens`` ``(..., d, d)``: every eigen-plane's frequency rescaled by the
    rule of ``rope_parameters`` for its wavelength (``liere.scaling.rescale_frequencies``)."""
    hermitian = 1j * gens.to(torch.complex128)
    lam, vecs = torch.linalg.eigh(hermitian)  # A = U diag(-i lam) U^H
    magnitude = lam.abs()
    order = magnitude.argsort(dim=-1, descending=True)
    ranked = magnitude.gather(-1, order)[..., ::2]  # each plane once (+w, -w adjacent after sorting by |lam|)
    scaled_ranked, attention = rescale_frequencies(ranked, rope_parameters, dim=dim, seq_len=seq_len)
    ratio_ranked = torch.where(ranked > 0, scaled_ranked / ranked.clamp_min(1e-300), torch.ones_like(ranked))
    ratio = torch.empty_like(magnitude).scatter_(-1, order, ratio_ranked.repeat_interleave(2, dim=-1))
    new_lam = (lam * ratio).to(torch.complex128)
    scaled = (vecs * (-1j * new_lam)[..., None, :]) @ vecs.mH
    scaled = scaled.real
    return (scaled - scaled.mT) / 2, attention


class ExtendedEncoding(PositionEncoding):
    """A rotary encoding whose generators were rescaled by ``extend``: ``R(p) = a exp(sum_a p_a f(A_a))`` over the
    source's rotated features (``a`` = the rule's attention factor; features beyond ``rot_dim`` pass through
    unscaled, as in transformers). ``dynamic`` recomputes ``f`` for the sequence length in use (largest
    coordinate + 1 per axis). Parameter-free: extension is for evaluation."""

    fp32_buffers = ("generators",)

    def __init__(self, source: PositionEncoding, rope_parameters: Sequence[RopeParameters]) -> None:
        gens, width = generators_and_width(source)
        super().__init__(head_dim=source.head_dim, num_axes=source.num_axes, depth=gens.shape[0])
        self.rot_dim = source.rot_dim
        self.width = width
        self.rope_parameters = [dict(p) for p in rope_parameters]
        self.source_positions = source.positions if isinstance(source, RoPE) else None
        self.register_buffer("generators", gens[..., : self.rot_dim, : self.rot_dim].float(), persistent=False)
        self.static = None if any(p.get("rope_type") == "dynamic" for p in self.rope_parameters) else self.scaled()

    def scaled(self, seq_lens: Sequence[int | None] | None = None) -> tuple[Tensor, float]:
        """``(f(A) (depth, heads, axes, r, r), attention factor)`` for per-axis sequence lengths ``seq_lens``."""
        seq_lens = seq_lens or [None] * self.num_axes
        out, attentions = [], set()
        for axis, params in enumerate(self.rope_parameters):
            gen, attention = rescale_generators(
                self.generators[:, :, axis].double(), params, dim=self.width, seq_len=seq_lens[axis]
            )
            out.append(gen)
            attentions.add(attention)
        if len(attentions) > 1:
            raise ValueError(f"extend: the axes' rope_parameters give different attention factors {sorted(attentions)}")
        return torch.stack(out, dim=2), attentions.pop()

    def rotations(self, coords: Tensor) -> Rotations:
        if self.source_positions is not None:
            coords = self.source_positions(coords)[..., None]
        if self.static is None:
            lengths = [int(coords[..., a].max().item()) + 1 for a in range(self.num_axes)]
            gens, attention = self.scaled(lengths)
        else:
            gens, attention = self.static
        gens = gens.to(coords.device)
        if self.num_axes == 1:  # exp(p A) = U diag(exp(-i p lam)) U^H from one eigen-decomposition of i A
            lam, vecs = torch.linalg.eigh(1j * gens[:, :, 0].to(torch.complex128))  # (depth, heads, r), (.., r, r)
            phases = torch.exp(-1j * coords[..., 0].double()[None, :, None, :, None] * lam[:, None, :, None])
            blocks = ((vecs[:, None, :, None] * phases[..., None, :]) @ vecs.mH[:, None, :, None]).real * attention
        else:
            angles = torch.einsum("sna,dhaij->dshnij", coords.double(), gens).contiguous()
            blocks = torch.linalg.matrix_exp(angles) * attention  # (depth, S, heads, n, r, r)
        return Rotations.from_blocks(blocks.to(coords.dtype)[..., None, :, :], self.head_dim)


def extend(pe: PositionEncoding, rope_parameters: RopeParameters | Sequence[RopeParameters]) -> ExtendedEncoding:
    """A new encoding: ``pe`` with every generator's spectrum rescaled by the rule of ``rope_parameters`` (Hugging
    Face's format, see ``liere.scaled_frequencies``); one dict for every axis or a sequence of one per axis (each
    with its own ``original_max_position_embeddings``). ``rope_theta`` defaults to ``pe.theta``. ``pe`` is left
    unchanged. Raises for encodings without rotations (``abs``, ``none``)."""
    per_axis = [rope_parameters] if isinstance(rope_parameters, Mapping) else list(rope_parameters)
    if len(per_axis) == 1:
        per_axis = per_axis * pe.num_axes
    if len(per_axis) != pe.num_axes:
        raise ValueError(f"extend: rope_parameters lists {len(per_axis)} dicts for {pe.num_axes} axes")
    theta = getattr(pe, "theta", None)
    filled = []
    for params in per_axis:
        check_rope_parameters(params)
        params = copy.deepcopy(dict(params))
        if theta is not None:
            params.setdefault("rope_theta", float(theta))
        filled.append(params)
    return ExtendedEncoding(pe, filled)


def separability_gap(pe: PositionEncoding, coords: Tensor) -> Tensor:
    """``|exp(sum_a p_a A_a) - prod_a exp(p_a A_a)|_F / sqrt(r)`` per layer, head and position ``(depth, heads, n)``
    for coords ``(n, axes)``: 0 for commuting generators; for an ``ExtendedEncoding`` (its static ``f(A_a)``) how
    far an off-axis rotation is from the product of the exactly extended per-axis rotations."""
    gens = pe.scaled()[0] if isinstance(pe, ExtendedEncoding) else generators_and_width(pe)[0]
    coords = coords.double()
    joint = torch.linalg.matrix_exp(torch.einsum("na,dhaij->dhnij", coords, gens).contiguous())
    product = torch.linalg.matrix_exp(coords[:, 0, None, None] * gens[:, :, None, 0])
    for axis in range(1, gens.shape[2]):
        product = product @ torch.linalg.matrix_exp(coords[:, axis, None, None] * gens[:, :, None, axis])
    return torch.linalg.matrix_norm(joint - product) / gens.shape[-1] ** 0.5
