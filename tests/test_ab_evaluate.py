"""train.ab.evaluate: patch shuffling, resize/canvas extrapolation grids, LM length eval, data-fraction subsets."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from liere import RoPE
from models.lm import CharLM
from models.vit import ViT
from train.ab import evaluate
from train.data import TensorImageDataset
from train.presets import RunConfig, preset_config
from train.tasks import load_task, train_subset, with_encoding

CPU = torch.device("cpu")


def tiny_vit(encoding: str, shape=(1, 16, 16), patch=4, pool: str = "cls") -> ViT:
    torch.manual_seed(0)
    return ViT(shape, 4, patch, encoding=encoding, dim=16, depth=1, heads=1, pool=pool).eval()


def images(n: int = 24, shape=(1, 16, 16)) -> TensorImageDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorImageDataset(torch.rand(n, *shape, generator=generator), torch.randint(4, (n,), generator=generator))


@pytest.mark.parametrize(("shape", "patch"), [((2, 3, 8, 12), (4, 3)), ((2, 1, 4, 8, 8), (2, 4, 4))])
def test_permute_patches_moves_whole_patches_and_inverse_restores(shape, patch):
    x = torch.randn(shape)
    patches = evaluate.patchify(x, patch)
    assert torch.equal(evaluate.unpatchify(patches, [s // p for s, p in zip(shape[2:], patch, strict=True)]), x)
    perms = evaluate.patch_permutations(shape[0], patches.shape[1], seed=3)
    assert not torch.equal(perms[0], torch.arange(patches.shape[1]))
    shuffled = evaluate.permute_patches(x, patch, perms)
    assert torch.equal(evaluate.patchify(shuffled, patch)[1], patches[1, perms[1]])  # output patch j = input perms[j]
    assert torch.equal(evaluate.permute_patches(shuffled, patch, perms.argsort(dim=1)), x)
    assert torch.equal(perms, evaluate.patch_permutations(shape[0], patches.shape[1], seed=3))  # fixed by seed


def test_shuffle_is_harmless_without_positions_and_visible_with_them():
    data = images()
    blind = evaluate.shuffle_eval(tiny_vit("none", pool="mean"), data, CPU, limit=100)
    assert blind["drop"] == 0 and blind["accuracy"] == blind["shuffled_accuracy"]
    model, x = tiny_vit("abs"), data.images[:4]
    perms = evaluate.patch_permutations(4, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(evaluate.permute_patches(x, model.patch_size, perms)))
    seen = evaluate.shuffle_eval(model, data, CPU, limit=100)
    assert math.isclose(seen["drop"], seen["accuracy"] - seen["shuffled_accuracy"])


def test_resize_extrapolation_grids_and_modes():
    assert evaluate.resized_shape([48, 48], (8, 8), 1.5) == ([72, 72], False)
    assert evaluate.resized_shape([48, 48], (8, 8), 1.25) == ([64, 64], True)  # 60 px -> nearest whole patches
    assert evaluate.resized_shape([8, 32, 32], (2, 8, 8), 2.0) == ([8, 64, 64], False)  # clips: T stays
    model = tiny_vit("rope-mixed")
    records = evaluate.extrapolate_eval(model, images(8), CPU, limit=8, factors=[1.0, 1.5, 2.0])
    assert [(r["factor"], r["mode"], r["grid"]) for r in records] == [
        (f, m, [g, g]) for f, g in ((1.0, 4), (1.5, 6), (2.0, 8)) for m in ("index", "stretch")
    ]
    assert model.coord_scale == "index"  # restored
    model.coord_scale = "stretch"
    assert model.coords([8, 8]).max() == pytest.approx(3.0)  # the 8x8 grid spans the trained 0..3 range
    model.coord_scale = "index"
    assert model.coords([8, 8]).max() == 7.0


def test_arrow_canvas_keeps_cell_size(tmp_path):
    config = preset_config("smoke", "arrow")  # 32 px, 4x4 grid of 8 px cells
    model = ViT([1, 32, 32], 8, 8, encoding="rope-mixed", dim=16, depth=1, heads=1).eval()
    records = evaluate.dataset_extrapolation_eval(model, config, CPU, limit=16, factors=[1.5])
    assert [(r["kind"], r["mode"], r["size"], r["grid"]) for r in records] == [
        ("canvas", m, [48, 48], [6, 6]) for m in ("index", "stretch")
    ]


def test_length_eval_at_longer_contexts_is_finite():
    torch.manual_seed(0)
    model = CharLM(11, context=8, encoding="rope", dim=16, depth=1, heads=1).eval()
    tokens = torch.randint(11, (400,))
    records = evaluate.length_eval(model, tokens, 8, [1, 2, 4], CPU, limit=300)
    assert [r["length"] for r in records] == [8, 16, 32]
    assert all(math.isfinite(r["bpc"]) and r["bpc"] > 0 for r in records)
    assert records[0]["tokens"] == records[1]["tokens"] == records[2]["tokens"]  # the same test tokens each time


def test_data_fraction_subsets_are_nested_and_shared():
    small, large = train_subset(1000, 0.1, seed=0), train_subset(1000, 0.3, seed=0)
    assert len(small) == 100 and len(large) == 300 and torch.equal(large[:100], small)
    assert torch.equal(train_subset(1000, 0.1, seed=0), small) and not torch.equal(train_subset(1000, 0.1, 1), small)
    config = preset_config("smoke", "digits", train_fraction=0.1)
    task = load_task(config)
    index = train_subset(len(task.splits.train), 0.1, config.data_seed)
    subset = torch.stack([task.splits.train[int(i)][0] for i in index]).flatten(1)
    for encoding in ("none", "liere8"):
        other = with_encoding(task, RunConfig(**(config.to_dict() | {"encoding": encoding})))
        for _, (x, _) in zip(range(12), other.batches(0), strict=False):
            assert (x.flatten(1)[:, None] == subset[None]).all(-1).any(-1).all()  # every image is from the subset
    assert "train_fraction" not in preset_config("smoke", "digits").trajectory()  # old runs keep their hash
    with pytest.raises(ValueError, match="train_fraction"):
        preset_config("smoke", "digits", train_fraction=1.5)


def test_options_fail_clearly():
    with pytest.raises(ValueError, match="--extrapolate"):
        evaluate.parse_list("1,x", "--extrapolate")
    with pytest.raises(ValueError, match="--evaluate"):
        evaluate.parse_evaluations("length", "arrow")
    assert evaluate.parse_evaluations("default", "austen") == ["length"]
    assert evaluate.parse_evaluations("none", "arrow") == []


def test_extension_length_eval_none_is_length_eval_and_methods_differ_beyond_the_context():
    torch.manual_seed(0)
    model = CharLM(11, context=8, encoding="rope", dim=16, depth=1, heads=1).eval()
    tokens = torch.randint(11, (400,))
    plain = evaluate.length_eval(model, tokens, 8, [1, 2, 4], CPU, limit=300)
    records = evaluate.extension_length_eval(model, tokens, 8, [1, 2, 4], CPU, limit=300)
    bpc = {(r["method"], r["multiple"]): r["bpc"] for r in records}
    assert {m for m, _ in bpc} == set(evaluate.EXTENSION_METHODS)
    assert [bpc["none", m] for m in (1, 2, 4)] == [r["bpc"] for r in plain]
    for method in evaluate.EXTENSION_METHODS:  # at the trained length every rule is the identity
        assert bpc[method, 1] == pytest.approx(bpc["none", 1], abs=1e-5)
    interpolated = copy.deepcopy(model)
    interpolated.encoding = RoPE(model.encoding.head_dim, interpolate_factor=4.0)  # PI = positions / 4
    (want,) = evaluate.length_eval(interpolated, tokens, 32, [1], CPU, limit=288)
    assert bpc["pi", 4] == pytest.approx(want["bpc"], abs=1e-5)


def test_extension_of_a_non_rotary_model_evaluates_none_only():
    torch.manual_seed(0)
    model = CharLM(11, context=8, encoding="none", dim=16, depth=1, heads=1).eval()
    records = evaluate.extension_length_eval(model, torch.randint(11, (200,)), 8, [1, 2], CPU, limit=100)
    assert [r["method"] for r in records] == ["none", "none"]


def test_extension_canvas_eval_on_arrow(tmp_path):
    config = preset_config("smoke", "arrow")
    shape = load_task(config).splits.test[0][0].shape
    torch.manual_seed(0)
    model = ViT(shape, 8, 8, encoding="liere8", dim=16, depth=1, heads=1, coord_scale="stretch").eval()
    grid = [s // 8 for s in shape[1:]]
    records = evaluate.extension_canvas_eval(model, config, grid, CPU, 16, [2.0], ["none", "yarn"])
    assert [(r["method"], r["factor"], r["kind"]) for r in records] == [
        ("none", 2.0, "canvas"),
        ("yarn", 2.0, "canvas"),
    ]
    assert model.coord_scale == "stretch"  # evaluated in index coordinates, the model's own mode restored


def test_unknown_extension_method_fails_clearly():
    with pytest.raises(ValueError, match="--extend: unknown method 'rope'; choose from none, pi, ntk, yarn, dynamic"):
        evaluate.extension_parameters("rope", 2.0, 8)
