"""multimodal_positions and M-RoPE axial RoPE against Qwen2-VL in Hugging Face transformers (tiny random config)."""

import pytest
import torch

import liere
from liere import multimodal_positions

SEQUENCES = [
    ([("text", 3), ("image", (1, 4, 4)), ("text", 2)], 2),
    ([("text", 3), ("image", (2, 4, 6)), ("text", 2), ("video", (3, 2, 4)), ("text", 1)], 2),
    ([("image", (1, 3, 2)), ("text", 4), ("image", (1, 1, 5)), ("video", (4, 2, 2)), ("text", 2)], 1),
    ([("text", 1), ("video", (2, 6, 2)), ("image", (1, 2, 2)), ("text", 5)], 2),
]


def rope_index(model: object, segments: list, merge: int) -> torch.Tensor:
    """transformers' positions ``(n, 3)`` for ``segments``: token types and grid_thw into ``get_rope_index``."""
    types, images, videos = [], [], []
    for kind, size in segments:
        if kind == "text":
            types += [0] * size
        else:
            (images if kind == "image" else videos).append(size)
            types += [1 if kind == "image" else 2] * (size[0] * size[1] * size[2] // merge**2)
    grids = {
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
    }
    ids = torch.zeros(1, len(types), dtype=torch.long)
    positions, _ = model.get_rope_index(ids, torch.tensor([types]), **grids)
    return positions[:, 0].T


@pytest.fixture(scope="module")
def qwen2_vl():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'liere[hf]')")

    def make(merge: int) -> object:
        text = dict(
            vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        )  # fmt: skip
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, spatial_merge_size=merge, mlp_ratio=1)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
        return transformers.Qwen2VLModel(config)

    return make


@pytest.mark.parametrize(("segments", "merge"), SEQUENCES)
def test_positions_match_get_rope_index(qwen2_vl, segments: list, merge: int) -> None:
    expected = rope_index(qwen2_vl(merge), segments, merge)
    got = multimodal_positions(segments, spatial_merge_size=merge)
    assert got.dtype == torch.long and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("segments", "merge"), SEQUENCES[1:3])
def test_mrope_axial_rope_rotates_like_qwen2_vl(qwen2_vl, segments: list, merge: int) -> None:
    """Same rotations as Qwen2VLRotaryEmbedding + apply_rotary_pos_emb, up to the pair layout (halves, interleaved)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    model = qwen2_vl(merge)
    positions = multimodal_positions(segments, spatial_merge_size=merge)
    rotary = Qwen2VLRotaryEmbedding(model.config.text_config)
    q = torch.randn(1, 2, len(positions), 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(q, positions.T[:, None])  # position_ids (3, batch, n)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    pe = liere.AxialRoPE(head_dim=16, num_axes=3, theta=10000.0, sections=(2, 3, 3))
    interleave = torch.stack([torch.arange(8), torch.arange(8) + 8], -1).flatten()  # halves -> interleaved pairs
    got = pe(positions[None].float()).apply(q[..., interleave])[..., interleave.argsort()]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_text_on_the_diagonal() -> None:
    """Text tokens sit at (p, p, p): axial RoPE with M-RoPE sections is 1D RoPE there, bitwise; a 3-axis LieRE is
    the 1D LieRE whose generator is the sum of the three, exp(p (A_t + A_h + A_w))."""
    positions = multimodal_positions([("text", 7)]).float()
    assert torch.equal(positions, torch.arange(7.0)[:, None].expand(-1, 3))
    q = torch.randn(1, 1, 7, 32)
    mrope = liere.AxialRoPE(head_dim=32, num_axes=3, theta=10000.0, sections=(4, 6, 6))
    assert torch.equal(
        mrope(positions[None]).apply(q), liere.RoPE(head_dim=32, theta=10000.0)(positions[None, :, :1]).apply(q)
    )
    lie = liere.build("liere8", head_dim=32, num_axes=3)
    with torch.no_grad():
        lie.generators.normal_(0, 0.3)
    dense = lie(positions[None]).to_dense()[0, 0, 0]  # (n, d, d)
    summed = lie.skew_generators()[0, 0].sum(0)  # (d, d)
    expected = torch.linalg.matrix_exp(torch.arange(7.0)[:, None, None] * summed)
    torch.testing.assert_close(dense, expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["axial-rope", "rope-mixed", "liere8", "visionllama", "comrope-ap8", "string-cayley"])
def test_positions_are_coordinates_of_every_3_axis_encoding(spec: str) -> None:
    positions = multimodal_positions([("text", 2), ("image", (2, 4, 4)), ("text", 3)], spatial_merge_size=2)
    pe = liere.build(spec, head_dim=24, num_axes=3, num_heads=2)
    rot = pe(positions[None].float())
    q = torch.randn(1, 2, len(positions), 24)
    assert rot.num_positions == 13 and rot.apply(q).shape == q.shape


@pytest.mark.parametrize(
    ("segments", "merge", "pattern"),
    [
        ([("text", 0)], 1, r"segments\[0\] \(text\) needs a positive int n, got 0"),
        ([("text", 2), ("image", (1, -2, 2))], 1, r"segments\[1\] \(image\) needs \(t, h, w\) of positive ints"),
        ([("video", (2, 2))], 1, r"segments\[0\] \(video\) needs \(t, h, w\)"),
        ([("image", (1, 4, 3))], 2, r"h=4 and w=3 must be divisible by spatial_merge_size=2"),
        ([("audio", 3)], 1, r"segments\[0\] must be \('text', n\)"),
        ([], 1, "non-empty"),
        ([("text", 2)], 0, "spatial_merge_size must be a positive int"),
    ],
)
def test_bad_segments_raise(segments: list, merge: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        multimodal_positions(segments, spatial_merge_size=merge)


def test_bad_sections_raise() -> None:
    with pytest.raises(ValueError, match="sections must be 3 positive ints"):
        liere.AxialRoPE(head_dim=16, num_axes=3, sections=(4, 4))
    with pytest.raises(ValueError, match=r"rotate 18 features, but head_dim=16"):
        liere.AxialRoPE(head_dim=16, num_axes=3, sections=(3, 3, 3))
