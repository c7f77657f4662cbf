"""Tests of the ViT (2D and 3D) and the char LM with every encoding family (tiny CPU sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liere import LieRE, Rotations
from models import CharLM, ViT

SPECS_2D = ["none", "abs", "sincos", "axial-rope", "rope-mixed", "liere8", "liere4", "liere16"]
SPECS_3D = ["axial-rope", "rope-mixed", "liere8"]
SPECS_LM = ["rope", "rope-mixed", "liere8", "abs"]
ROTARY_2D = ["axial-rope", "rope-mixed", "liere8"]
VOCAB, CONTEXT = 11, 16


def vit_2d(encoding: str, **kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT((3, 16, 16), 5, 4, encoding=encoding, dim=32, depth=2, heads=2, **kwargs)


def vit_3d(encoding: str, **kwargs) -> ViT:
    torch.manual_seed(0)  # head_dim 24: divisible by 6 (axial over 3 axes), 4 (mixed) and 8 (liere8)
    return ViT((1, 4, 16, 16), 5, (2, 4, 4), encoding=encoding, dim=48, depth=2, heads=2, **kwargs)


def char_lm(encoding: str, **kwargs) -> CharLM:
    torch.manual_seed(0)
    return CharLM(VOCAB, CONTEXT, encoding, dim=32, depth=2, heads=2, **kwargs)


def classification_batch(model: ViT, spatial: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, model.in_channels, *spatial, generator=gen)
    return images, torch.randint(0, 5, (8,), generator=gen)


def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (8, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def vit_loss(model: ViT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def check_gradients(model: nn.Module) -> None:
    """Every parameter gets a finite, non-zero gradient; per-layer encoding parameters in every layer."""
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    for name, param in model.encoding.named_parameters():
        if getattr(model.encoding, "depth", 1) > 1:
            per_layer = param.grad.flatten(1).abs().sum(dim=1)
            assert (per_layer > 0).all(), f"encoding.{name}: layers {per_layer.tolist()} some without gradient"


def overfit(model: nn.Module, loss_fn, steps: int = 30) -> tuple[float, float]:
    """Loss before and after ``steps`` Adam steps on one fixed batch."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "make, spec, spatial",
    [(vit_2d, s, (16, 16)) for s in SPECS_2D] + [(vit_3d, s, (4, 16, 16)) for s in SPECS_3D],
    ids=[f"2d-{s}" for s in SPECS_2D] + [f"3d-{s}" for s in SPECS_3D],
)
def test_vit_trains_with_every_encoding(make, spec, spatial):
    model = make(spec)
    batch = classification_batch(model, spatial)
    vit_loss(model, batch).backward()
    check_gradients(model)
    model.zero_grad()
    first, last = overfit(model, lambda m: vit_loss(m, batch))
    assert last < 0.5 * first


@pytest.mark.parametrize("spec", SPECS_LM)
def test_char_lm_trains_with_every_encoding(spec):
    model = char_lm(spec)
    idx, targets = lm_batch()
    model.loss(idx, targets).backward()
    check_gradients(model)
    model.zero_grad()
    first, last = overfit(model, lambda m: m.loss(idx, targets))
    assert last < 0.7 * first


def test_vit_3d_mean_pool_with_registers_trains():
    model = vit_3d("liere8", pool="mean", num_registers=2)
    batch = classification_batch(model, (4, 16, 16))
    vit_loss(model, batch).backward()
    check_gradients(model)
    assert model.no_weight_decay() == {"encoding.generators", "registers"}


def test_rotations_computed_once_per_forward_with_prefix_tokens_unrotated():
    model = vit_2d("liere8", num_registers=2)
    seen: list[Rotations] = []
    model.encoding.register_forward_hook(lambda module, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    model(torch.randn(2, 3, 16, 16))
    assert len(seen) == 1
    kwargs, rot = seen[0]
    assert kwargs["num_prefix_tokens"] == 3 and rot.depth == 2 and rot.num_positions == 3 + 16
    dense = rot.to_dense()  # (depth, S, H, n, head_dim, head_dim)
    eye = torch.eye(16).expand_as(dense[:, :, :, :3])
    torch.testing.assert_close(dense[:, :, :, :3], eye)
    assert not torch.allclose(dense[:, :, :, 4], torch.eye(16).expand_as(dense[:, :, :, 4]))


@pytest.mark.parametrize("spec", ["abs", "sincos", *ROTARY_2D])
@pytest.mark.parametrize("coord_scale", ["index", "stretch"])
def test_vit_runs_at_larger_resolutions(spec, coord_scale):
    model = vit_2d(spec, coord_scale=coord_scale).eval()
    with torch.no_grad():
        for side in (24, 32):
            out = model(torch.randn(2, 3, side, side))
            assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("coord_scale", ["index", "stretch"])
def test_vit_3d_runs_on_longer_larger_clips(coord_scale):
    model = vit_3d("liere8", coord_scale=coord_scale).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 8, 24, 24))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert model.coords((4, 6, 6)).amax(dim=0).tolist() == ([3.0, 5.0, 5.0] if coord_scale == "index" else [1, 3, 3])


def test_coord_scale_places_larger_grids():
    index, stretch = vit_2d("liere8"), vit_2d("liere8", coord_scale="stretch")
    assert torch.equal(index.coords((4, 4)), stretch.coords((4, 4)))  # the training grid is the same
    big_index, big_stretch = index.coords((8, 8)), stretch.coords((8, 8))
    assert big_index.max() == 7 and torch.allclose(big_stretch.max(), torch.tensor(3.0))
    assert torch.equal(stretch.grid((8, 8)).coords(), big_stretch)  # the grid the forward uses


def test_unit_coords_span_zero_to_one_on_the_training_grid():
    unit, stretch = vit_2d("liere8", unit_coords=True), vit_2d("liere8", unit_coords=True, coord_scale="stretch")
    torch.testing.assert_close(unit.coords((4, 4)), vit_2d("liere8").coords((4, 4)) / 3)
    assert unit.coords((4, 4)).amax(0).tolist() == [1.0, 1.0]
    torch.testing.assert_close(unit.coords((7, 7)).amax(0), torch.tensor([2.0, 2.0]))  # index: spacing 1/3 kept
    torch.testing.assert_close(stretch.coords((7, 7)).amax(0), torch.tensor([1.0, 1.0]))


def test_stretch_at_training_resolution_equals_index():
    index, stretch = vit_2d("liere8"), vit_2d("liere8", coord_scale="stretch")
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(index(images), stretch(images))


def test_char_lm_runs_past_its_context():
    for spec in ("rope", "liere8", "abs", "sincos"):
        out = char_lm(spec)(torch.randint(0, VOCAB, (2, 2 * CONTEXT)))
        assert out.shape == (2, 2 * CONTEXT, VOCAB) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", ["rope", "liere8", "abs"])
def test_char_lm_is_causal(spec):
    model = char_lm(spec).eval()
    idx = torch.randint(0, VOCAB, (2, CONTEXT))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_char_lm_head_tying():
    tied, untied = char_lm("rope"), char_lm("rope", tie_embeddings=False)
    assert tied.head.weight is tied.token_embed.weight
    assert untied.head.weight is not untied.token_embed.weight


def test_vit_accepts_a_built_encoding():
    encoding = LieRE(head_dim=16, num_axes=2, num_heads=2, depth=1, block_size=4)
    model = ViT((3, 16, 16), 5, 4, encoding=encoding, dim=32, depth=2, heads=2)
    assert model.encoding is encoding
    vit_loss(model, classification_batch(model, (16, 16))).backward()
    assert encoding.generators.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="head_dim"):
        ViT((3, 16, 16), 5, 4, encoding=encoding, dim=64, depth=2, heads=2)


def test_vit_sizes_by_name():
    model = ViT((3, 32, 32), 10, 16, encoding="rope-mixed", size="small")
    assert model.dim == 384 and len(model.transformer.blocks) == 12
    assert model.encoding.freqs.shape[:2] == (12, 6)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(2, 16, 16), r"\(B, C, H, W\)"),
        (torch.randn(2, 1, 16, 16), "channels"),
        (torch.randn(2, 3, 18, 16), "divisible"),
        (torch.randn(2, 3, 4, 16, 16), r"\(B, C, H, W\)"),
    ],
)
def test_vit_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        vit_2d("liere8")(images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_shape=(3, 18, 16)), "divisible"),
        (dict(image_shape=(16, 16)), "image_shape"),
        (dict(patch_size=(4, 4, 4)), "patch_size"),
        (dict(pool="max"), "pool"),
        (dict(coord_scale="squeeze"), "coord_scale"),
        (dict(heads=3), "divisible by heads"),
        (dict(size="huge"), "size"),
        (dict(encoding="liere7"), "block_size=7"),
        (dict(weight_init="kaiming"), "weight_init"),
    ],
)
def test_vit_rejects_bad_config(kwargs, match):
    config = dict(image_shape=(3, 16, 16), num_classes=5, patch_size=4, dim=32, depth=2, heads=2) | kwargs
    with pytest.raises(ValueError, match=match):
        ViT(**config)


def test_weight_init_schemes_set_the_linear_weight_scale():
    """timm's std 0.02 at any width, or xavier's sqrt(2 / (fan_in + fan_out)); biases zero either way."""
    sizes = dict(image_shape=(1, 16, 16), num_classes=5, patch_size=4, dim=64, depth=2, heads=1)
    timm_like, xavier = ViT(**sizes), ViT(**sizes, weight_init="xavier")
    qkv = [m.attn.qkv for m in (timm_like.transformer.blocks[0], xavier.transformer.blocks[0])]
    assert abs(qkv[0].weight.std().item() - 0.02) < 0.002
    assert abs(qkv[1].weight.std().item() - (2 / (64 + 192)) ** 0.5) < 0.005
    assert all(not layer.bias.any() for layer in qkv)
    lm = CharLM(VOCAB, CONTEXT, dim=64, depth=2, heads=1, weight_init="xavier")
    assert abs(lm.transformer.blocks[0].attn.qkv.weight.std().item() - (2 / (64 + 192)) ** 0.5) < 0.005


def test_char_lm_rejects_bad_input():
    with pytest.raises(ValueError, match="idx"):
        char_lm("rope")(torch.randn(2, 8))
    with pytest.raises(ValueError, match="context"):
        CharLM(VOCAB, 0)
