"""The timm adapter driven through timm's own API: training, checkpointing, copies, threads, export, weights."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from liere import grid_coords

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from liere.integrations import forward_state  # noqa: E402
from liere.integrations.timm import (  # noqa: E402
    RotaryTimmAttention,
    RotaryVisionTransformer,
    liere_timm_vit,
    load_timm_weights,
)
from models import ViT  # noqa: E402

TINY_TIMM = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


ADAPTER_OPTIONS = ("coord_scale", "axis_order", "keep_pos_embed", "shift_coords", "jitter_coords", "rescale_coords")


def tiny_timm_vit(encoding: str, **kwargs):
    """A 2-block timm ViT-Tiny at 32 px adapted to ``encoding``; adapter options and timm kwargs both accepted."""
    torch.manual_seed(0)
    options = {k: kwargs.pop(k) for k in ADAPTER_OPTIONS if k in kwargs}
    return liere_timm_vit("vit_tiny_patch16_224", encoding, create_kwargs=TINY_TIMM | kwargs, **options)


def layer0_rotations(model, images):
    """The rotations block 0's attention uses in one forward of ``model``."""
    seen = []
    hook = model.blocks[0].attn.register_forward_pre_hook(
        lambda m, args: seen.append(forward_state.current_scope().get(args[0].shape[1]).for_layer(0))
    )
    model(images)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("spec", ["liere8", "rope-mixed", "sincos"])
def test_timm_vit_trains_one_step(spec):
    model = tiny_timm_vit(spec)
    assert model.pos_embed is None and all(isinstance(b.attn, RotaryTimmAttention) for b in model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.liere_encoding.named_parameters():
        per_layer = param.grad.flatten(1).abs().sum(dim=1)
        assert torch.isfinite(param.grad).all() and (per_layer > 0).all(), f"{name}: {per_layer.tolist()}"
    opt.step()
    assert forward_state._stack() == []  # released after the forward


def test_timm_attention_uses_the_encoding_rotations_with_cls_unrotated():
    model = tiny_timm_vit("liere8", reg_tokens=2).eval()
    captured = {}
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    model(torch.randn(2, 3, 32, 32))

    attn, x = model.blocks[1].attn, captured["x"]
    rot = model.liere_encoding(grid_coords(4, 4), num_prefix_tokens=3)[1]  # CLS + 2 registers unrotated
    q, k, v = attn.qkv(x).reshape(2, 19, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (rot.apply(q) @ rot.apply(k).transpose(-1, -2)) / 8.0
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 19, 192))
    torch.testing.assert_close(captured["out"], expected, rtol=1e-4, atol=1e-5)
    dense = rot.to_dense()[0, 0, :, :3]
    torch.testing.assert_close(dense, torch.eye(64).expand_as(dense))


def test_timm_rotations_computed_once_per_forward():
    model = tiny_timm_vit("liere8")
    calls = []
    model.liere_encoding.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_timm_dynamic_image_size_grows_the_grid():
    model = tiny_timm_vit("rope-mixed", dynamic_img_size=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 64))
        rot = layer0_rotations(model, torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 5) and rot.num_positions == 1 + 6 * 8
    torch.testing.assert_close(rot.cos, model.liere_encoding(grid_coords(6, 8), num_prefix_tokens=1)[0].cos)


def test_timm_abs_keeps_timm_pos_embed_and_bad_models_are_rejected():
    model = tiny_timm_vit("abs")
    assert model.pos_embed is not None and not hasattr(model, "liere_encoding")
    with pytest.raises(TypeError, match="VisionTransformer"):
        liere_timm_vit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="coord_scale"):
        tiny_timm_vit("liere8", coord_scale="pixels")
    with pytest.raises(ValueError, match="axis_order"):
        tiny_timm_vit("axial-rope", axis_order="yx")
    with pytest.raises(TypeError, match="Block"):
        tiny_timm_vit("liere8", block_fn=timm.models.vision_transformer.ResPostBlock)


# ----------------------------------------------------------------------------------- inference and copies
@pytest.mark.parametrize("spec", ["liere8", "rope-mixed"])
def test_timm_inference_mode_first_call_equals_no_grad(spec):
    model = tiny_timm_vit(spec).eval()
    with torch.inference_mode():
        first = model(IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(first, model(IMAGES), rtol=0, atol=0)


def test_timm_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        model = tiny_timm_vit("liere8", drop_rate=0.0)
        model.set_grad_checkpointing(checkpointed)
        F.cross_entropy(model(IMAGES), torch.tensor([1, 3])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    intermediates = model.forward_intermediates(IMAGES, intermediates_only=True)
    assert len(intermediates) == 2 and forward_state._stack() == []


def test_timm_deepcopy_pickle_and_save_give_independent_equal_models():
    model = tiny_timm_vit("liere8").eval()
    expected = model(IMAGES)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is RotaryVisionTransformer
        torch.testing.assert_close(other(IMAGES), expected, rtol=0, atol=0)
    with torch.no_grad():
        copies[0].liere_encoding.generators.zero_()  # the copy's own encoding, not the original's
    torch.testing.assert_close(model(IMAGES), expected, rtol=0, atol=0)
    assert not torch.allclose(copies[0](IMAGES), expected)


def test_timm_model_ema_v3_tracks_the_adapted_model():
    from timm.utils import ModelEmaV3

    model = tiny_timm_vit("liere8")
    ema = ModelEmaV3(model, decay=0.5)
    F.cross_entropy(model(IMAGES), torch.tensor([0, 1])).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    ema.update(model)
    gens = model.liere_encoding.generators
    assert not torch.equal(ema.module.liere_encoding.generators, gens)
    ema_out = ema.module(IMAGES)
    assert ema_out.shape == (2, 5) and torch.isfinite(ema_out).all()


def test_timm_two_threads_at_different_image_sizes(run_in_threads):
    model = tiny_timm_vit("liere8", dynamic_img_size=True).eval()
    inputs = {32: torch.randn(2, 3, 32, 32), 48: torch.randn(2, 3, 48, 40)}
    with torch.no_grad():
        expected = {size: model(x) for size, x in inputs.items()}

    def run(size: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                torch.testing.assert_close(model(inputs[size]), expected[size], rtol=0, atol=0)

    assert run_in_threads(run, inputs) == []


def test_timm_forward_intermediates_releases_rotations():
    model = tiny_timm_vit("rope-mixed").eval()
    final, intermediates = model.forward_intermediates(IMAGES)
    assert forward_state._stack() == [] and len(intermediates) == 2
    torch.testing.assert_close(final, model.forward_features(IMAGES))


# ----------------------------------------------------------------------------------- timm conventions
def test_timm_weights_load_into_the_adapted_model():
    torch.manual_seed(3)
    plain = timm.create_model("vit_tiny_patch16_224", **TINY_TIMM)
    state = plain.state_dict()
    model = tiny_timm_vit("liere8")
    report = load_timm_weights(model, state)
    assert report.dropped == ["pos_embed"]
    assert report.new_encoding_params == [f"liere_encoding.{n}" for n, _ in model.liere_encoding.named_parameters()]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, plain.blocks[1].attn.qkv.weight)
    # "none" plus the kept pos_embed is timm's own model, bit for bit
    kept = tiny_timm_vit("none", keep_pos_embed=True).eval()
    assert load_timm_weights(kept, state).dropped == []
    torch.testing.assert_close(kept(IMAGES), plain.eval()(IMAGES), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unexpected"):
        load_timm_weights(model, state | {"extra.weight": torch.zeros(1)})


def test_timm_pretrained_true_from_a_local_file(tmp_path):
    torch.manual_seed(4)
    path = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", **TINY_TIMM).state_dict(), path)
    overlay = dict(file=str(path), num_classes=5)
    model = tiny_timm_vit("liere8", pretrained=True, pretrained_cfg_overlay=overlay)
    state = torch.load(path)
    for name, value in model.state_dict().items():
        if not name.startswith("liere_encoding."):
            torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)


def test_timm_optimizer_factory_does_not_decay_the_encoding():
    from timm.optim import create_optimizer_v2

    model = tiny_timm_vit("liere8")
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.liere_encoding.generators) not in decay
    assert id(model.blocks[0].attn.qkv.weight) in decay
    assert "liere_encoding.generators" in model.no_weight_decay()


@pytest.mark.parametrize("spec", ["liere8", "rope-mixed"])
def test_timm_patch_dropout_gathers_each_samples_rotations(spec):
    model = tiny_timm_vit(spec, patch_drop_rate=0.5, reg_tokens=1)
    keep = []
    model.patch_drop.register_forward_hook(lambda m, args, out: keep.append(out))
    rot = layer0_rotations(model, IMAGES)
    assert rot.num_positions == 2 + 8  # CLS + register + half of the 16 patches
    # reference: the encoding evaluated at each sample's kept coordinates, found by matching kept tokens
    full = model.patch_embed(IMAGES)  # (B, 16, dim), no absolute embedding for rotary specs
    kept = keep[0][:, 2:]
    index = torch.stack([torch.cdist(k, f).argmin(dim=1) for k, f in zip(kept, full, strict=True)])
    coords = grid_coords(4, 4)[index]  # (B, 8, 2)
    expected = model.liere_encoding(coords, num_prefix_tokens=2)[0]
    torch.testing.assert_close(rot.to_dense(), expected.to_dense(), rtol=1e-5, atol=1e-6)
    F.cross_entropy(model(IMAGES), torch.tensor([0, 1])).backward()
    assert model.liere_encoding.parameters().__next__().grad.abs().sum() > 0


@pytest.mark.parametrize("scale", ["unit", "stretch"])
def test_timm_coord_scales(scale):
    model = tiny_timm_vit("rope-mixed", coord_scale=scale, dynamic_img_size=True).eval()
    with torch.no_grad():
        rot = layer0_rotations(model, torch.randn(1, 3, 48, 48))  # 6 x 6 patches, trained on 4 x 4
    spacing = 1 / 5 if scale == "unit" else 3 / 5
    expected = model.liere_encoding(grid_coords(6, 6, spacing=spacing), num_prefix_tokens=1)[0]
    torch.testing.assert_close(rot.cos, expected.cos)
    torch.testing.assert_close(rot.sin, expected.sin)


def test_timm_coordinate_augmentation_matches_timms_rope_augmentation():
    from timm.layers.pos_embed_sincos import _apply_coord_augs

    augment = dict(shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0)
    model = tiny_timm_vit("rope-mixed", **augment)
    torch.manual_seed(7)
    rot = layer0_rotations(model, IMAGES)
    torch.manual_seed(7)
    coords = _apply_coord_augs(grid_coords(4, 4), **augment)  # timm's own augmentation, same draws
    torch.testing.assert_close(rot.cos, model.liere_encoding(coords, num_prefix_tokens=1)[0].cos)
    with torch.no_grad():
        eval_rot = layer0_rotations(model.eval(), IMAGES)  # no augmentation in eval mode
    torch.testing.assert_close(eval_rot.cos, model.liere_encoding(grid_coords(4, 4), num_prefix_tokens=1)[0].cos)
    with pytest.raises(ValueError, match="jitter_coords"):
        tiny_timm_vit("liere8", jitter_coords=0.5)


# ----------------------------------------------------------------------------------- export
def tiny_vit(spec: str) -> ViT:
    torch.manual_seed(0)
    return ViT((3, 32, 32), 5, 8, encoding=spec, dim=64, depth=2, heads=2).eval()


EXPORTED = {
    "vit-liere8": lambda: tiny_vit("liere8"),
    "vit-rope-mixed": lambda: tiny_vit("rope-mixed"),
    "timm-liere8": lambda: tiny_timm_vit("liere8").eval(),
    "timm-rope-mixed": lambda: tiny_timm_vit("rope-mixed").eval(),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPORTED))
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_matches_eager(name, strict):
    model = EXPORTED[name]()
    with torch.no_grad():
        expected = model(IMAGES)
        program = torch.export.export(model, (IMAGES,), strict=strict)
        torch.testing.assert_close(program.module()(IMAGES), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EXPORTED))
def test_jit_trace_matches_eager(name):
    model = EXPORTED[name]()
    with torch.no_grad():
        traced = torch.jit.trace(model, (IMAGES,), check_trace=False)
        torch.testing.assert_close(traced(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)
    assert isinstance(model, (ViT, VisionTransformer))


@pytest.mark.parametrize("name", ["vit-liere8", "timm-liere8"])
def test_jit_trace_with_grad_enabled_matches_eager(name):
    model = EXPORTED[name]()
    traced = torch.jit.trace(model, (IMAGES,), check_trace=False)  # autograd on while tracing
    torch.testing.assert_close(traced(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)
