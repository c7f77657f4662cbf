"""Properties of the rotary encodings: orthogonality, agreement with independent references, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import liere
from liere import AxialRoPE, LieRE, RoPE, RoPEMixed, grid_coords

torch.manual_seed(0)


def scores(rot: liere.Rotations, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention logits ``(batch, heads, n, n)`` after rotating q and k."""
    return rot.apply(q) @ rot.apply(k).transpose(-1, -2)


def rotary_encodings(num_axes: int) -> list[liere.PositionEncoding]:
    """One of every rotary encoding for ``num_axes`` axes (head_dim 24, 3 heads)."""
    encodings: list[liere.PositionEncoding] = [
        RoPEMixed(24, num_axes, num_heads=3, depth=2, seed=0),
        LieRE(24, num_axes, num_heads=3, depth=2, block_size=4, init="normal", init_std=0.3, seed=0),
        LieRE(24, num_axes, num_heads=3, block_size=3, init="normal", init_std=0.3, seed=1),
        LieRE(24, num_axes, num_heads=1, block_size=24, init="normal", init_std=0.1, seed=2),
        LieRE(24, num_axes, num_heads=3, block_size=8, rot_dim=16, seed=3),
    ]
    basis = liere.build("string-cayley", head_dim=24, num_axes=num_axes, num_heads=3, depth=2, rot_dim=20)
    with torch.no_grad():
        basis.skew.normal_()  # a non-trivial learned basis: rotations kept as Q rot(p) Q^T
    encodings.append(basis)
    if num_axes == 1:
        encodings.append(RoPE(24))
    if 24 % (2 * num_axes) == 0:
        encodings.append(AxialRoPE(24, num_axes))
    return encodings


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_rotations_are_orthogonal_and_transpose_inverts(num_axes: int) -> None:
    coords = torch.randn(2, 7, num_axes) * 5
    for pe in rotary_encodings(num_axes):
        dense = pe(coords).to_dense().double()
        eye = torch.eye(24, dtype=torch.float64)
        assert (dense.transpose(-1, -2) @ dense - eye).abs().max() < 1e-5, pe
        back = pe(coords).transpose().to_dense().double()
        assert (back @ dense - eye).abs().max() < 1e-5, pe


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_apply_equals_dense_matmul(num_axes: int) -> None:
    """Shared and per-sample coords, shared and per-head rotations, pairs and blocks, partial rot_dim."""
    for coords in (torch.randn(6, num_axes) * 3, torch.randn(2, 6, num_axes) * 3):
        for pe in rotary_encodings(num_axes):
            rot = pe(coords)
            q = torch.randn(2, 3, 6, 24)
            dense = rot.to_dense()  # (depth, S, H, n, d, d)
            for layer in range(rot.depth):
                expected = torch.einsum("shnij,shnj->shni", dense[layer], q)
                torch.testing.assert_close(rot[layer].apply(q), expected, atol=1e-5, rtol=1e-5)


def test_liere_dense_matches_scipy_expm_of_generators() -> None:
    """to_dense() equals expm(sum_a p_a A_a), built independently from skew_generators() in fp64 SciPy."""
    for block_size in (2, 3, 4, 8, 24):
        pe = LieRE(24, 2, num_heads=2, depth=2, block_size=block_size, init="uniform", seed=block_size)
        coords = torch.rand(5, 2)  # the paper's [0, 1] coordinates for its uniform init
        dense = pe(coords).to_dense()[:, 0].detach().double().numpy()  # (depth, heads, n, d, d)
        gens = pe.skew_generators().detach().double().numpy()  # (depth, heads, axes, d, d)
        assert np.abs(gens + np.swapaxes(gens, -1, -2)).max() == 0
        for layer, head, i in np.ndindex(2, 2, 5):
            algebra = np.tensordot(coords[i].double().numpy(), gens[layer, head], axes=1)
            np.testing.assert_allclose(dense[layer, head, i], scipy.linalg.expm(algebra), atol=2e-5)


def test_skew_generators_are_block_diagonal_with_passthrough() -> None:
    pe = LieRE(16, 3, num_heads=2, depth=3, block_size=4, rot_dim=12, init="normal", init_std=1.0)
    gens = pe.skew_generators()
    assert gens.shape == (3, 2, 3, 16, 16)
    mask = torch.block_diag(*[torch.ones(4, 4)] * 3, torch.zeros(4, 4)).bool()
    assert gens[..., ~mask].abs().max() == 0
    assert gens[..., mask].abs().min() >= 0 and gens[..., mask].abs().sum() > 0
    dense = pe(torch.randn(4, 3)).to_dense()
    torch.testing.assert_close(dense[..., 12:, 12:], torch.eye(4).expand_as(dense[..., 12:, 12:]))


def test_rope_matches_rotary_embedding_torch() -> None:
    from rotary_embedding_torch import RotaryEmbedding

    for head_dim, rot_dim in ((64, None), (32, None), (64, 32)):
        ref = RotaryEmbedding(dim=rot_dim or head_dim)
        pe = RoPE(head_dim, rot_dim=rot_dim)
        q = torch.randn(2, 4, 50, head_dim)
        ours = pe(grid_coords(50)).apply(q)
        theirs = ref.rotate_queries_or_keys(q)
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        q16 = q.to(torch.bfloat16)
        ours16, theirs16 = pe(grid_coords(50)).apply(q16), ref.rotate_queries_or_keys(q16)
        assert ours16.dtype == torch.bfloat16
        torch.testing.assert_close(ours16, theirs16, atol=0, rtol=0)


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_relative_position_invariance(num_axes: int) -> None:
    """Translating all coordinates leaves q.k scores unchanged for commuting encodings."""
    coords = torch.randn(8, num_axes, dtype=torch.float64) * 4
    shift = torch.randn(num_axes, dtype=torch.float64) * 10
    q, k = torch.randn(2, 3, 8, 24, dtype=torch.float64), torch.randn(2, 3, 8, 24, dtype=torch.float64)
    invariant = [pe for pe in rotary_encodings(num_axes) if num_axes == 1 or not isinstance(pe, LieRE)]
    invariant += [LieRE(24, num_axes, num_heads=3, block_size=2, init="normal", init_std=0.5)]
    for pe in invariant:
        pe = pe.double()
        before, after = pe(coords), pe(coords + shift)
        for layer in range(before.depth):
            torch.testing.assert_close(scores(before[layer], q, k), scores(after[layer], q, k), atol=1e-8, rtol=1e-8)


def test_liere_2d_is_not_translation_invariant() -> None:
    """Non-commuting generators (LieRE, b >= 3, 2 axes) break exact relative-position invariance."""
    pe = LieRE(24, 2, block_size=8, init="normal", init_std=0.5, seed=0).double()
    coords = torch.randn(8, 2, dtype=torch.float64)
    q, k = torch.randn(1, 1, 8, 24, dtype=torch.float64), torch.randn(1, 1, 8, 24, dtype=torch.float64)
    gap = scores(pe(coords), q, k) - scores(pe(coords + 3.0), q, k)
    assert gap.abs().max() > 1e-3


def test_liere_block2_spans_rope_mixed() -> None:
    """LieRE with block size 2 and RoPE-Mixed with the same frequencies rotate identically."""
    mixed = RoPEMixed(32, 2, num_heads=4, depth=3, seed=0)
    liere2 = LieRE(32, 2, num_heads=4, depth=3, block_size=2, seed=0)
    coords = grid_coords(5, 6)
    torch.testing.assert_close(liere2(coords).to_dense(), mixed(coords).to_dense())  # same init
    with torch.no_grad():
        mixed.freqs.normal_()
        liere2.generators.copy_(mixed.freqs.unsqueeze(-1))
    torch.testing.assert_close(liere2(coords).to_dense(), mixed(coords).to_dense())


def test_liere_rope_init_starts_at_rope_mixed() -> None:
    """The default init puts RoPE-Mixed's frequencies on each block's pairs: same rotations at step 0."""
    for block_size in (4, 8, 32):
        mixed = RoPEMixed(32, 2, num_heads=2, depth=2, seed=3)
        pe = LieRE(32, 2, num_heads=2, depth=2, block_size=block_size, seed=3)
        coords = grid_coords(4, 4)
        torch.testing.assert_close(pe(coords).to_dense(), mixed(coords).to_dense(), atol=1e-5, rtol=1e-5)


def test_every_layer_and_head_gets_gradient() -> None:
    """Unlike the official code (layer 0's rotations reused everywhere), each layer's generators learn."""
    for pe in (
        LieRE(16, 2, num_heads=2, depth=4, block_size=8),
        LieRE(16, 2, num_heads=2, depth=4, block_size=2),
        RoPEMixed(16, 2, num_heads=2, depth=4),
    ):
        rot = pe(grid_coords(3, 3), num_prefix_tokens=1)
        q = torch.randn(2, 2, 10, 16)
        loss = sum((rot[i].apply(q) * torch.randn_like(q)).sum() for i in range(4))
        loss.backward()
        param = next(pe.parameters())
        per_set = param.grad.abs().flatten(2).sum(-1)  # (depth, heads)
        assert torch.isfinite(param.grad).all() and (per_set > 0).all(), per_set


def test_prefix_tokens_stay_unrotated() -> None:
    pe = LieRE(16, 2, num_heads=2, depth=2, block_size=4, init="normal", init_std=1.0)
    rot = pe(grid_coords(3, 3), num_prefix_tokens=2)
    assert rot.num_positions == 11
    q = torch.randn(2, 2, 11, 16)
    out = rot[1].apply(q)
    assert torch.equal(out[:, :, :2], q[:, :, :2])
    torch.testing.assert_close(out[:, :, 2:], pe(grid_coords(3, 3))[1].apply(q[:, :, 2:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_nan_in_low_precision_with_large_coordinates(dtype: torch.dtype) -> None:
    coords = grid_coords(30, 30) * 10  # up to 290 per axis
    for pe in [*rotary_encodings(2), LieRE(24, 2, block_size=24, init="uniform")]:
        q = torch.randn(1, 3, 900, 24).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rot = pe(coords)
            out = rot.for_layer(0).apply(q)
        assert out.dtype == dtype and torch.isfinite(out).all(), pe
        norm_ratio = out.float().norm(dim=-1) / q.float().norm(dim=-1)
        assert (norm_ratio - 1).abs().max() < 2e-2, pe


def test_fp64_path_and_gradcheck() -> None:
    pe = LieRE(8, 2, block_size=4, init="normal", init_std=0.5).double()
    coords = torch.randn(3, 2, dtype=torch.float64)
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64)

    def rotate(gens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pe.generators.copy_(gens.detach())
        pe.generators.grad = None
        return torch.func.functional_call(pe, {"generators": gens}, (coords,)).apply(q)

    assert torch.autograd.gradcheck(rotate, (pe.generators.detach().clone().requires_grad_(),))


def test_no_weight_decay_names_the_encoding_parameters() -> None:
    assert LieRE(16, 2).no_weight_decay() == {"generators"}
    assert RoPEMixed(16, 2).no_weight_decay() == {"freqs"}
    assert RoPE(16).no_weight_decay() == set()


def test_model_level_no_weight_decay_names_reach_every_encoding() -> None:
    from train.loop import param_groups

    class Custom(torch.nn.Module):  # one encoding per block, plus one shared module reached from two blocks
        def __init__(self) -> None:
            super().__init__()
            shared = RoPEMixed(16, 2)
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"pe": LieRE(16, 2), "shared": shared}) for _ in "ab")
            self.head = torch.nn.Linear(16, 4)

    model = Custom()
    names = liere.no_weight_decay_names(model)
    assert names == {"blocks.0.pe.generators", "blocks.1.pe.generators", "blocks.0.shared.freqs"}
    assert names <= dict(model.named_parameters()).keys()  # the names named_parameters() gives (shared: once)
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.head.weight)}
    assert len(no_decay["params"]) == 4  # two generators, the shared freqs, the head's bias
