"""timm's RoPE ViTs ported onto liere encodings (``port_timm_rope``) and encoding switches that keep the logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from liere.integrations.timm_rope import (  # noqa: E402
    RotaryEva,
    port_timm_rope,
    switch_encoding,
    timm_rope_coords,
)
from models import ViT  # noqa: E402

# one tiny config per family: (timm name, kwargs); a 2 x 4 patch grid so rows and columns differ
FAMILIES = {
    "naver-axial": ("vit_small_patch16_rope_224", dict(img_size=(32, 64))),
    "naver-mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=(32, 64))),
    "naver-axial-ape": ("vit_small_patch16_rope_ape_224", dict(img_size=(32, 64))),
    "naver-mixed-ape": ("vit_small_patch16_rope_mixed_ape_224", dict(img_size=(32, 64))),
    "rope-reg-gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=(32, 64))),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=(28, 56))),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=(32, 64))),
    "pe-core": ("vit_pe_core_tiny_patch16_384", dict(img_size=(32, 64))),
}


def tiny_timm_rope(family: str):
    """A 2-block timm RoPE model of ``family`` with weights at a trained model's scale, and a batch of images."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # timm initialises layer scales at 1e-5: make every block matter
        for key, p in model.named_parameters():
            if key != "rope.freqs":
                p.normal_(0, 0.5 if "gamma" in key else 0.1)
    return model, torch.randn(2, 3, *kwargs["img_size"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ported_timm_rope_model_gives_timms_logits(family):
    eva, images = tiny_timm_rope(family)
    with torch.no_grad():
        expected = eva(images)
        port = port_timm_rope(copy.deepcopy(eva)).eval()
        assert isinstance(port, RotaryEva) and port.rope is None
        assert max_diff(port(images), expected) <= 1e-5
        if family.startswith("naver"):  # same frequencies, pairs and fp32 math: bitwise
            assert torch.equal(port(images), expected)
        # the coordinates matter: the other axis order gives other logits
        port.rope_coords["grid_indexing"] = "xy" if port.rope_coords["grid_indexing"] == "ij" else "ij"
        assert max_diff(port(images), expected) > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec", ["liere8", "liere64", "liere2", "rope-mixed", "rope-basis"])
def test_switching_a_ported_model_keeps_the_logits_and_trains_the_new_encoding(family, spec):
    eva, images = tiny_timm_rope(family)
    with torch.no_grad():
        expected = eva(images)
    model = switch_encoding(port_timm_rope(eva).eval(), spec)
    with torch.no_grad():
        assert max_diff(model(images), expected) <= 1e-4
    F.cross_entropy(model.train()(images), torch.tensor([0, 1])).backward()
    for name, param in model.liere_encoding.named_parameters():
        assert param.requires_grad and param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.liere_encoding.parameters())


def assert_train_forward_equal(port: torch.nn.Module, eva: torch.nn.Module, images: torch.Tensor, seed: int) -> None:
    """The port and timm's model give the same training-mode logits under the same random draws."""
    torch.manual_seed(seed)
    expected = eva.train()(images)
    torch.manual_seed(seed)
    torch.testing.assert_close(port.train()(images), expected, rtol=1e-5, atol=1e-5)


def test_dinov3_train_time_coordinate_augmentation_matches_timm():
    name, kwargs = FAMILIES["dinov3"]
    torch.manual_seed(0)
    augment = dict(rope_shift_coords=0.5, rope_jitter_coords=1.5, rope_rescale_coords=2.0)
    eva = timm.create_model(name, pretrained=False, depth=2, num_classes=5, drop_path_rate=0.0, **kwargs, **augment)
    images = torch.randn(2, 3, *kwargs["img_size"])
    assert_train_forward_equal(port_timm_rope(copy.deepcopy(eva)), eva, images, seed=3)


@pytest.mark.parametrize("family", ["naver-mixed", "eva02"])
def test_patch_dropout_keeps_each_samples_rotations_and_intermediates_match(family):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    eva = timm.create_model(name, pretrained=False, depth=2, num_classes=5, patch_drop_rate=0.5, **kwargs)
    images = torch.randn(3, 3, *kwargs["img_size"])
    port = port_timm_rope(copy.deepcopy(eva))
    assert_train_forward_equal(port, eva, images, seed=5)
    with torch.no_grad():
        ours = port.eval().forward_intermediates(images, intermediates_only=True)
        theirs = eva.eval().forward_intermediates(images, intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dynamic_image_size_and_grad_checkpointing():
    eva, _ = tiny_timm_rope("dinov3")  # dynamic_img_size=True, normalised coordinates follow the grid
    port = port_timm_rope(copy.deepcopy(eva)).eval()
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert max_diff(port(images), eva(images)) <= 1e-5
    grads = []
    for checkpointed in (False, True):
        model = copy.deepcopy(port).train()
        model.set_grad_checkpointing(checkpointed)
        F.cross_entropy(model(images), torch.tensor([1])).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_timm_rope_coords_match_timms_grid():
    from timm.layers.pos_embed_sincos import _build_grid

    for options in (
        dict(grid_type="index", grid_offset=1.0, ref_feat_shape=(24, 24), grid_indexing="xy"),
        dict(grid_type="centered", normalize_coords="max", grid_indexing="ij"),
        dict(grid_type="pixel", grid_indexing="ij"),
    ):
        expected = _build_grid([3, 5], **options).reshape(-1, 2)
        torch.testing.assert_close(timm_rope_coords((3, 5), **options), expected)


@pytest.mark.parametrize("source", ["rope-mixed", "axial-rope", "axial-rope:theta=10000"])
def test_switch_encoding_of_models_vit_and_adapted_timm_vits_keeps_the_logits(source):
    from liere.integrations.timm import liere_timm_vit

    torch.manual_seed(0)
    vit = ViT((3, 32, 32), 5, 8, encoding=source, dim=64, depth=2, heads=2).eval()
    tiny = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    adapted = liere_timm_vit("vit_tiny_patch16_224", source, create_kwargs=tiny, axis_order="xy").eval()
    images = torch.randn(2, 3, 32, 32)
    for model in (vit, adapted):
        with torch.no_grad():
            expected = model(images)
            for spec in ("liere8", "liere32", "rope-basis", "rope-mixed"):
                assert max_diff(switch_encoding(copy.deepcopy(model), spec)(images), expected) <= 1e-4, spec
    with pytest.raises(TypeError, match="RoPE"):
        switch_encoding(ViT((3, 32, 32), 5, 8, encoding="liere8", dim=64, depth=2, heads=2), "liere16")


def test_bad_input_is_refused_with_nothing_converted():
    with pytest.raises(TypeError, match="Eva"):
        port_timm_rope(torch.nn.Linear(2, 2))
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28, use_rot_pos_emb=False)
    with pytest.raises(ValueError, match="no rotary embedding"):
        port_timm_rope(eva)
    port = port_timm_rope(tiny_timm_rope("eva02")[0])
    before = port.liere_encoding
    for spec, error, message in (
        ("liere6", ValueError, "divide head_dim=64"),
        ("liere1", ValueError, "divide"),
        ("comrope-ap", ValueError, "switch to"),
        ("sincos", ValueError, "switch to"),
    ):
        with pytest.raises(error, match=message):
            switch_encoding(port, spec)
        assert port.liere_encoding is before
    with pytest.raises(TypeError, match="models.ViT"):
        switch_encoding(torch.nn.Linear(2, 2), "liere8")
    with pytest.raises(ValueError, match="pretrained"):
        port_timm_rope(port, pretrained=True)


def test_pretrained_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set; pass pretrained_cfg_overlay"):
        port_timm_rope("eva02_tiny_patch14_224", pretrained=True)


def logit_difference_table() -> str:
    """Markdown rows: family | port | switch to liere8 | switch to liere64 (max |logit difference| vs timm)."""
    rows = []
    for family in FAMILIES:
        eva, images = tiny_timm_rope(family)
        with torch.no_grad():
            expected = eva(images)
            port = port_timm_rope(eva).eval()
            cells = [max_diff(port(images), expected)]
            cells += [
                max_diff(switch_encoding(copy.deepcopy(port), s)(images), expected) for s in ("liere8", "liere64")
            ]
        rows.append(f"| {family} ({FAMILIES[family][0]}) | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # OMP_NUM_THREADS=1 python tests/test_timm_rope.py
    print(logit_difference_table())
