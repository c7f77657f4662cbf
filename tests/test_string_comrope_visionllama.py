"""The extended collection: VisionLlama RoPE, Cayley/Circulant STRING, ComRoPE AP/LD and learned-basis RoPE."""

from __future__ import annotations

import math

import pytest
import torch

import liere
from liere import CayleySTRING, CirculantSTRING, ComRoPE, LieRE, RoPE, RoPEBasis, RoPEMixed, VisionLlamaRoPE
from liere.string_pe import circulant, skew_circulant_row

torch.manual_seed(0)

NEW_SPECS = ["visionllama", "string-cayley", "string-circulant", "comrope-ap", "comrope-ld4", "rope-basis"]


def perturbed(pe: liere.PositionEncoding, std: float = 0.3, seed: int = 0) -> liere.PositionEncoding:
    """``pe`` with random noise added to every parameter (so tests do not only see the initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pe.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return pe


def commuting_encodings(num_axes: int) -> list[liere.PositionEncoding]:
    """Every new learned encoding with commuting generators, perturbed away from its init (head_dim 16)."""
    return [
        perturbed(CayleySTRING(16, num_axes, num_heads=3, depth=2, seed=0)),
        perturbed(CayleySTRING(16, num_axes, num_heads=1, rot_dim=12, seed=1)),
        perturbed(CirculantSTRING(16, num_axes, num_heads=3, depth=2, seed=0)),
        perturbed(CirculantSTRING(16, num_axes, num_heads=1, rot_dim=11, seed=1)),
        perturbed(ComRoPE(16, num_axes, num_heads=3, depth=2, variant="ap", block_size=4)),
        perturbed(ComRoPE(16, num_axes, num_heads=3, depth=2, variant="ld", block_size=8, seed=0)),
        perturbed(ComRoPE(16, num_axes, num_heads=1, variant="ld", block_size=3, rot_dim=15, seed=1)),
        perturbed(RoPEBasis(16, num_axes, num_heads=3, depth=2, seed=0)),
    ]


def scores(rot: liere.Rotations, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return rot.apply(q) @ rot.apply(k).transpose(-1, -2)


def all_layer_scores(pe: liere.PositionEncoding, coords: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    rot = pe(coords)
    return torch.stack([scores(rot[i], q, k) for i in range(rot.depth)])


def test_factory_builds_every_new_spec_with_per_layer_per_head_parameters() -> None:
    coords = liere.grid_coords(3, 4)
    for spec in NEW_SPECS:
        num_axes = 1 if spec == "rope-basis" else 2
        pe = liere.build(spec, head_dim=16, num_axes=num_axes, num_heads=3, depth=2)
        rot = pe(coords[:, :num_axes], num_prefix_tokens=1)
        assert rot.num_positions == 13 and rot.head_dim == 16, spec
        for name, p in pe.named_parameters():
            assert p.shape[:2] == (2, 3), (spec, name)
        assert pe.no_weight_decay() == {name for name, _ in pe.named_parameters()}
    assert liere.build("comrope-ld4", head_dim=16, num_axes=2).block_size == 4
    assert liere.build("comrope-ap", head_dim=16, num_axes=2).block_size == 8
    assert liere.build("visionllama:coord_convention=paper", head_dim=16, num_axes=2).coord_convention == "paper"


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_rotations_are_orthogonal(num_axes: int) -> None:
    coords = torch.randn(2, 5, num_axes) * 5
    for pe in [*commuting_encodings(num_axes), VisionLlamaRoPE(16, num_axes, coord_convention="paper")]:
        dense = pe(coords).to_dense().double()
        eye = torch.eye(16, dtype=torch.float64)
        assert (dense.transpose(-1, -2) @ dense - eye).abs().max() < 1e-5, pe


@pytest.mark.parametrize("num_axes", [2, 3])
def test_generators_commute_and_rotations_equal_their_fp64_exponential(num_axes: int) -> None:
    coords = torch.randn(5, num_axes, dtype=torch.float64) * 3
    for pe in commuting_encodings(num_axes):
        pe = pe.double()
        gens = pe.skew_generators()  # (depth, heads, axes, d, d)
        assert gens.shape[2:] == (num_axes, 16, 16), pe
        torch.testing.assert_close(gens, -gens.transpose(-1, -2))
        for a in range(num_axes):
            for b in range(a):
                comm = gens[:, :, a] @ gens[:, :, b] - gens[:, :, b] @ gens[:, :, a]
                assert comm.abs().max() < 1e-10, pe
        algebra = torch.einsum("na,dhaij->dhnij", coords, gens).contiguous()
        expected = torch.linalg.matrix_exp(algebra)
        torch.testing.assert_close(pe(coords).to_dense()[:, 0], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_axes", [2, 3])
def test_translation_invariance(num_axes: int) -> None:
    coords = torch.randn(6, num_axes) * 3
    shift = torch.randn(num_axes) * 4
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    fixed = [VisionLlamaRoPE(16, num_axes, rot_dim=12), VisionLlamaRoPE(16, num_axes, coord_convention="paper")]
    for pe in commuting_encodings(num_axes) + fixed:
        before, after = all_layer_scores(pe, coords, q, k), all_layer_scores(pe, coords + shift, q, k)
        torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4, msg=lambda m, pe=pe: f"{pe}: {m}")


def test_liere_2d_with_random_generators_is_not_translation_invariant() -> None:
    """The contrast: LieRE's generators do not commute, so scores depend on absolute position."""
    pe = LieRE(16, 2, num_heads=3, block_size=8, init="normal", init_std=0.3, seed=0)
    gens = pe.skew_generators().detach()
    assert (gens[:, :, 0] @ gens[:, :, 1] - gens[:, :, 1] @ gens[:, :, 0]).abs().max() > 1e-2
    coords, shift = torch.randn(6, 2) * 3, torch.tensor([2.0, -3.0])
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    change = (all_layer_scores(pe, coords + shift, q, k) - all_layer_scores(pe, coords, q, k)).abs().max()
    assert change > 1e-1


def test_initialisations_start_at_the_rope_family() -> None:
    coords = torch.randn(7, 2) * 4
    mixed = RoPEMixed(16, 2, num_heads=3, depth=2, seed=5)(coords).to_dense()
    string = CayleySTRING(16, 2, num_heads=3, depth=2, seed=5)(coords).to_dense()
    torch.testing.assert_close(string, mixed, atol=1e-5, rtol=0)
    positions = torch.arange(9.0)[:, None]
    torch.testing.assert_close(RoPEBasis(16)(positions).to_dense(), RoPE(16)(positions).to_dense(), atol=1e-5, rtol=0)
    # ComRoPE-AP starts axial: block j turns with axis j mod 2 only
    ap = ComRoPE(16, 2, block_size=4)
    only_axis0 = ap(torch.tensor([[1.5, 0.0]])).to_dense()[0, 0, 0, 0].reshape(4, 4, 4, 4).diagonal(dim1=0, dim2=2)
    eye = torch.eye(4)
    for j in range(4):
        assert torch.allclose(only_axis0[..., j], eye) == (j % 2 == 1), j


def test_circulant_string_generators_are_skew_circulants_with_the_learned_row() -> None:
    pe = perturbed(CirculantSTRING(16, 2, num_heads=2, rot_dim=9))
    gens = pe.skew_generators()[..., :9, :9]
    row = skew_circulant_row(pe.rows, 9)
    assert row.shape[-1] == 9 and torch.equal(row[..., 1:5], pe.rows) and torch.equal(row[..., 5:], -pe.rows.flip(-1))
    torch.testing.assert_close(gens, circulant(row))
    assert torch.equal(circulant(torch.arange(3.0)), torch.tensor([[0.0, 1, 2], [2, 0, 1], [1, 2, 0]]))
    rot = pe(torch.randn(4, 2)).to_dense()[..., :9, :9]
    torch.testing.assert_close(rot, circulant(rot[..., 0, :]))  # exp of a circulant is circulant


def test_comrope_ld_blocks_share_one_direction_per_block() -> None:
    pe = perturbed(ComRoPE(16, 3, num_heads=2, variant="ld", block_size=4, seed=0))
    blocks = pe.skew_generators().detach().unflatten(-2, (4, 4)).unflatten(-1, (4, 4)).diagonal(dim1=-4, dim2=-2)
    flat = blocks.movedim(-1, -3).flatten(-2)  # (depth, heads, axes, nb, 16)
    cos = torch.nn.functional.cosine_similarity(flat[:, :, 0], flat[:, :, 1], dim=-1)
    assert torch.allclose(cos.abs(), torch.ones_like(cos), atol=1e-6)


def test_visionllama_frequencies_axes_split_and_conventions() -> None:
    pe = VisionLlamaRoPE(64, num_axes=3)
    assert pe.rot_dim == 60 and not list(pe.parameters())
    torch.testing.assert_close(pe.freqs, torch.exp(-4 * torch.linspace(0, 1, 10)))
    coords = torch.tensor([[2.0, 3.0, 5.0]])
    angles = torch.atan2(pe(coords).sin, pe(coords).cos)[0, 0, 0, 0]  # (30,)
    expected = torch.remainder(coords[0, :, None] * pe.freqs + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(angles, expected.flatten(), atol=1e-5, rtol=0)
    # "paper": every grid is squeezed to [0, 1] per axis (the official linspace(0, 1)), at any resolution
    paper, index = VisionLlamaRoPE(16, 2, coord_convention="paper"), VisionLlamaRoPE(16, 2)
    for shape in [(4, 6), (9, 5)]:
        squeezed = liere.grid_coords(*shape, spacing=[1 / (n - 1) for n in shape])
        expected = index(squeezed).to_dense()
        torch.testing.assert_close(paper(liere.grid_coords(*shape)).to_dense(), expected)
        torch.testing.assert_close(paper(liere.grid_coords(*shape) * 3 + 7).to_dense(), expected)


@pytest.mark.parametrize("block_size", [3, 4, 8, 16])
def test_rope_basis_from_liere_reproduces_1d_liere(block_size: int) -> None:
    rot_dim = 16 - 16 % block_size  # block size 3: 15 features, 5 zero eigenvalues and a pass-through feature
    liere_1d = LieRE(16, 1, num_heads=2, depth=2, block_size=block_size, rot_dim=rot_dim, init="uniform", seed=0)
    basis = RoPEBasis.from_liere(liere_1d)
    assert basis.head_dim == 16 and basis.freqs.shape == (2, 2, 1, 8)
    positions = torch.linspace(-1.5, 1.5, 31)[:, None]
    torch.testing.assert_close(basis(positions).to_dense(), liere_1d(positions).to_dense(), atol=1e-5, rtol=0)
    # far-out integer positions (angles of thousands of radians): exact in fp64
    liere_1d, far = liere_1d.double(), torch.arange(0.0, 500.0, 7.0, dtype=torch.float64)[:, None]
    basis = RoPEBasis.from_liere(liere_1d)
    assert basis.freqs.dtype == torch.float64
    torch.testing.assert_close(basis(far).to_dense(), liere_1d(far).to_dense(), atol=1e-6, rtol=0)


def test_rope_basis_from_liere_with_passthrough_features() -> None:
    liere_1d = LieRE(16, 1, num_heads=2, block_size=3, rot_dim=12, init="normal", init_std=0.5, seed=0)
    basis = RoPEBasis.from_liere(liere_1d)
    assert (basis.freqs == 0).sum() == 2 * 4  # per head: 4 zero eigenvalues (3-blocks) + 4 pass-through = 4 pairs
    positions = torch.linspace(-10, 10, 21)[:, None]
    torch.testing.assert_close(basis(positions).to_dense(), liere_1d(positions).to_dense(), atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter_of_every_layer_and_head() -> None:
    coords = torch.randn(5, 2) * 2
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    for pe in commuting_encodings(2):
        weights = torch.randn(pe.depth, 2, 3, 5, 5)
        (all_layer_scores(pe, coords, q, k) * weights).sum().backward()
        for name, p in pe.named_parameters():
            per_set = p.grad.flatten(2).abs().sum(-1)  # (depth, heads)
            assert (per_set > 0).all(), (pe, name)


def test_bf16_autocast_with_large_coordinates_has_no_nan() -> None:
    coords = torch.rand(6, 2) * 1e4
    q = torch.randn(1, 3, 6, 16, dtype=torch.bfloat16)
    encodings = [*commuting_encodings(2), VisionLlamaRoPE(16, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for pe in encodings:
            rot = pe(coords)
            assert rot.dtype == torch.float32, pe
            out = rot.for_layer(0).apply(q)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), pe


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CayleySTRING(15, 2), "head_dim=15 must be divisible by 4"),
        (lambda: RoPEBasis(8, rot_dim=5), "rot_dim=5 must be divisible by 2"),
        (lambda: CayleySTRING(16, 2, rot_dim=10), "divisible by 4"),
        (lambda: CirculantSTRING(16, 2, rot_dim=2), "rot_dim must be >= 3"),
        (lambda: CirculantSTRING(16, 2, num_heads=0), "num_heads must be a positive int"),
        (lambda: ComRoPE(16, 2, variant="xy"), "variant must be one of"),
        (lambda: ComRoPE(16, 2, block_size=6), "divisible by 6"),
        (lambda: ComRoPE(16, 3, variant="ap", block_size=8), "at least num_axes=3 blocks"),
        (lambda: ComRoPE(16, 2, block_size=1), "block_size must be an int >= 2"),
        (lambda: VisionLlamaRoPE(16, 2, coord_convention="pixels"), "coord_convention must be one of"),
        (lambda: VisionLlamaRoPE(4, 3), "head_dim=4 is too small"),
        (lambda: VisionLlamaRoPE(16, 3, rot_dim=16), "divisible by 6"),
        (lambda: RoPEBasis.from_liere(LieRE(16, 2)), "must be 1D"),
        (lambda: liere.build("comrope-xx", head_dim=16), "unknown encoding spec"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
