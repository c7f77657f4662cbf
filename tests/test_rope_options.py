"""RoPE's rotary-embedding-torch options (offset, interpolation, NTK theta, frequency cache) and the xPos recipe."""

from __future__ import annotations

import pytest
import torch

from liere import Grid, RoPE, grid_coords
from liere.rope import xpos_scale

rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
RotaryEmbedding = rotary_embedding_torch.RotaryEmbedding

Q = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(0))  # (batch, heads, n, head_dim)


def theirs(rotary: RotaryEmbedding, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
    return rotary.rotate_queries_or_keys(t, seq_dim=-2, offset=offset)


@pytest.mark.parametrize("offset", [0, 17])
@pytest.mark.parametrize("interpolate_factor", [1.0, 4.0])
@pytest.mark.parametrize("theta_rescale_factor", [1.0, 8.0])
def test_rope_options_equal_rotary_embedding_torch(offset, interpolate_factor, theta_rescale_factor):
    options = dict(interpolate_factor=interpolate_factor, theta_rescale_factor=theta_rescale_factor)
    rotary = RotaryEmbedding(16, **options)
    ours = RoPE(32, rot_dim=16, offset=offset, **options)(grid_coords(40))
    torch.testing.assert_close(ours.apply(Q), theirs(rotary, Q, offset), rtol=1e-5, atol=1e-5)


def test_offset_is_a_shift_of_the_coordinates():
    shifted = RoPE(32, offset=5.0)(grid_coords(40)).apply(Q)
    torch.testing.assert_close(shifted, RoPE(32)(grid_coords(40) + 5).apply(Q), rtol=0, atol=0)


@pytest.mark.parametrize("start", [0, 9])
def test_frequency_cache_is_bitwise_the_uncached_rope(start):
    cached, plain = RoPE(32, cache_len=64), RoPE(32)
    coords = grid_coords(40) + start
    hit = cached.cached_rotations(coords[None], (float(start), 1.0))
    assert hit is not None and hit.num_positions == 40
    assert cached.cached_rotations(coords[None], None) is None  # only known consecutive positions are sliced
    torch.testing.assert_close(cached(coords).apply(Q), plain(coords).apply(Q), rtol=0, atol=0)
    torch.testing.assert_close(cached(coords).apply(Q), theirs(RotaryEmbedding(32), Q, start), rtol=1e-5, atol=1e-5)
    # outside the cache, or not consecutive integers: computed as usual
    assert cached.cached_rotations((grid_coords(40) + 30)[None], (30.0, 1.0)) is None
    assert cached.cached_rotations((grid_coords(40) * 0.5)[None], (0.0, 0.5)) is None
    torch.testing.assert_close(cached(grid_coords(40) * 0.5).apply(Q), plain(grid_coords(40) * 0.5).apply(Q))
    grid = Grid((40,), offset=float(start))  # a Grid is known consecutive: sliced with no device sync
    torch.testing.assert_close(cached(grid).apply(Q), plain(coords).apply(Q), rtol=0, atol=0)
    assert cached.to(torch.bfloat16).cache_cos.dtype == torch.float32  # the cache stays fp32 when cast


def test_xpos_recipe_equals_rotary_embedding_torch():
    rotary = RotaryEmbedding(16, use_xpos=True)
    k = torch.randn_like(Q)
    q_ref, k_ref = rotary.rotate_queries_and_keys(Q, k, seq_dim=-2)
    rot, scale = RoPE(32, rot_dim=16)(grid_coords(40)), xpos_scale(torch.arange(40), 16)
    q_ours, k_ours = rot.apply(Q), rot.apply(k)
    q_ours[..., :16] *= scale
    k_ours[..., :16] /= scale
    torch.testing.assert_close(q_ours, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_ours, k_ref, rtol=1e-5, atol=1e-5)


def test_rope_options_reject_bad_values():
    with pytest.raises(ValueError, match="interpolate_factor"):
        RoPE(32, interpolate_factor=0.5)
    with pytest.raises(ValueError, match="offset"):
        RoPE(32, offset=float("nan"))
    with pytest.raises(ValueError, match="theta_rescale_factor"):
        RoPE(32, theta_rescale_factor=0)
    with pytest.raises(ValueError, match="cache_len"):
        RoPE(32, cache_len=0)


def test_settings_fixed_at_construction_refuse_assignment():
    """theta, offset and interpolate_factor set the frequency table and cache when built: assigning them raises."""
    from liere import AxialRoPE

    rope, axial = RoPE(16, cache_len=8), AxialRoPE(16)
    for pe, name in ((rope, "theta"), (rope, "offset"), (rope, "interpolate_factor"), (axial, "theta")):
        before = getattr(pe, name)
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(pe, name, 2.0)
        assert getattr(pe, name) == before
