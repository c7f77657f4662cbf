"""Coordinates: ``Grid`` carries what is known (finite, evenly spaced), tensors are validated on every call, and
nothing depends on a cache: inference mode, in-place edits, tracing and compiling all see the right coordinates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liere
import liere.block_exp
from liere import Grid, LieRE, PositionEncoding, grid_coords
from models import CharLM, ViT


def test_grid_coords_equal_grid_coords_plus_offset() -> None:
    grid = Grid((3, 4), spacing=(0.5, 2.0), offset=(1.0, -3.0))
    expected = grid_coords(3, 4, spacing=[0.5, 2.0]) + torch.tensor([1.0, -3.0])
    assert torch.equal(grid.coords(), expected)
    assert Grid((3, 4), 0.5) == Grid((3, 4), (0.5, 0.5), (0.0, 0.0))  # one number means every axis
    assert Grid(5) == Grid((5,)) and Grid(5).num_positions == 5 and Grid((2, 3, 4)).num_axes == 3
    assert torch.equal(Grid((4,), offset=7).coords(dtype=torch.float64), torch.arange(7.0, 11.0).double()[:, None])
    assert Grid((4,), 0.5, 2.0).progression() == (2.0, 0.5) and Grid((2, 2)).progression() is None


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Grid(()), ValueError, "at least one grid size"),
        (lambda: Grid((3, 0)), ValueError, "shape must be positive ints"),
        (lambda: Grid((3, True)), ValueError, "shape must be positive ints"),
        (lambda: Grid((3, 4), spacing=(1.0,)), ValueError, "spacing has 1 entries"),
        (lambda: Grid((3,), offset=float("nan")), ValueError, "offset must be finite"),
        (lambda: Grid((3,), spacing="1"), TypeError, "spacing must be numbers"),
        (lambda: LieRE(16, 2)(Grid((4,))), ValueError, "grid has 1 axes"),
        (lambda: LieRE(16, 2)(grid_coords(2, 2), num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
        (lambda: LieRE(16, 2)(grid_coords(2, 2), num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    ],
)
def test_bad_grids_raise_naming_the_argument(make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_grid_skips_reading_values_tensor_is_read_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    pe = LieRE(16, 2)
    reads = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: reads.append(1) or isfinite(t))
    for _ in range(2):
        pe(Grid((3, 3)))
    assert reads == []
    coords = grid_coords(3, 3)
    for _ in range(2):
        pe(coords)
    assert len(reads) == 2  # one check per call: nothing cached on the tensor's id or version


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_in_place_edits_without_a_version_bump_are_seen(edit: str) -> None:
    pe = LieRE(16, 1, block_size=8, seed=0)
    coords = grid_coords(6)
    pe(coords)
    view = coords.data if edit == "data" else coords.numpy()
    view[3, 0] = 9.0  # no longer evenly spaced: the powers path must not reuse the old progression
    torch.testing.assert_close(pe(coords).to_dense(), pe(coords.clone()).to_dense(), atol=0, rtol=0)
    view[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pe(coords)


@pytest.mark.parametrize("spec", ["liere8", "liere3", "comrope-ld8", "rope-mixed"])
def test_grid_and_its_tensor_give_identical_rotations(spec: str) -> None:
    for shape in [(7,), (3, 4), (2, 2, 3)]:
        pe = liere.build(spec, head_dim=24, num_axes=len(shape), num_heads=2, depth=2)
        grid = Grid(shape, spacing=0.5, offset=1.0)
        torch.testing.assert_close(pe(grid, 1).to_dense(), pe(grid.coords(), 1).to_dense(), atol=0, rtol=0)


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT((3, 16, 16), 5, 4, encoding="liere8", dim=32, depth=2, heads=2).eval()


def tiny_lm(encoding: str) -> CharLM:
    torch.manual_seed(0)
    return CharLM(11, 16, encoding, dim=32, depth=2, heads=2).eval()


def tiny_timm() -> nn.Module:
    pytest.importorskip("timm")
    from liere.integrations.timm import liere_timm_vit

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    return liere_timm_vit("vit_tiny_patch16_224", "liere8", create_kwargs=kwargs).eval()


def tiny_x_transformers() -> nn.Module:
    pytest.importorskip("x_transformers")
    from x_transformers import Decoder, TransformerWrapper

    from liere.integrations.x_transformers import liere_x_transformers

    torch.manual_seed(0)
    decoder = Decoder(dim=32, depth=2, heads=2, attn_dim_head=16)
    model = TransformerWrapper(num_tokens=20, max_seq_len=32, use_abs_pos_emb=False, attn_layers=decoder)
    liere_x_transformers(model, "liere8")
    return model.eval()


MODELS = {
    "vit": (tiny_vit, lambda: torch.randn(2, 3, 16, 16)),
    "char-lm-liere8": (lambda: tiny_lm("liere8"), lambda: torch.randint(0, 11, (2, 12))),
    "char-lm-abs": (lambda: tiny_lm("abs"), lambda: torch.randint(0, 11, (2, 12))),
    "timm": (tiny_timm, lambda: torch.randn(2, 3, 32, 32)),
    "x-transformers": (tiny_x_transformers, lambda: torch.randint(0, 20, (2, 12))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_inference_mode_works_on_the_first_call(name: str) -> None:
    make, inputs = MODELS[name]
    model, x = make(), inputs()
    with torch.inference_mode():
        out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    with torch.inference_mode():  # also with inference tensors as raw coordinates
        rot = LieRE(16, 2)(grid_coords(3, 3))
    assert rot.num_positions == 9


@pytest.mark.slow
def test_1d_grid_takes_the_powers_path_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    pe = LieRE(64, 1, num_heads=2, depth=2, block_size=16, recompute=False, seed=0)  # the spy cannot run in checkpoint
    q = torch.randn(2, 2, 13, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    powers = liere.block_exp.skew_expm_progression
    monkeypatch.setattr(liere.block_exp, "skew_expm_progression", lambda *a: calls.append(a[1:]) or powers(*a))

    def fn(q: torch.Tensor) -> torch.Tensor:
        return pe(Grid((12,), offset=3.0), num_prefix_tokens=1)[1].apply(q)

    eager = fn(q)
    assert calls == [(3.0, 1.0, 12, "auto")]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q)
    assert calls[1:] == [(3.0, 1.0, 12, "auto")]  # traced once, through the powers path
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    monkeypatch.setattr(pe, "uses_progression", False)  # the general path: one exponential per position
    torch.testing.assert_close(fn(q), eager, atol=1e-5, rtol=0)


class Rotate(nn.Module):
    """``pe(coords).apply(q)`` with raw coordinates: the finiteness check sits on this path."""

    def __init__(self) -> None:
        super().__init__()
        self.pe = LieRE(16, 2, num_heads=2, block_size=8, seed=0)

    def forward(self, coords: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.pe(coords, num_prefix_tokens=1).apply(q)


@pytest.mark.parametrize("how", ["export-strict", "export-non-strict", "jit-trace", "fx-leaf"])
def test_tracing_skips_the_value_checks(how: str) -> None:
    model, coords, q = Rotate().eval(), grid_coords(3, 4), torch.randn(2, 2, 13, 16)
    if how.startswith("export"):
        traced = torch.export.export(model, (coords, q), strict=how == "export-strict").module()
    elif how == "jit-trace":
        traced = torch.jit.trace(model, (coords, q), check_trace=False)
    else:

        class Leaves(torch.fx.Tracer):
            def is_leaf_module(self, module: nn.Module, name: str) -> bool:
                return isinstance(module, PositionEncoding) or super().is_leaf_module(module, name)

        traced = torch.fx.GraphModule(model, Leaves().trace(model))
    torch.testing.assert_close(traced(coords, q), model(coords, q), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_vit_exports_and_traces_with_grids() -> None:
    model, images = tiny_vit(), torch.randn(2, 3, 16, 16)
    expected = model(images)
    for strict in (True, False):
        exported = torch.export.export(model, (images,), strict=strict).module()
        torch.testing.assert_close(exported(images), expected, atol=1e-5, rtol=0)
    traced = torch.jit.trace(model, (images,), check_trace=False)
    torch.testing.assert_close(traced(images), expected, atol=1e-5, rtol=0)


def test_char_lm_trains_through_grids() -> None:
    model = tiny_lm("liere8").train()
    tokens = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert (model.encoding.generators.grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("spec", ["liere8", "comrope-ld8"])
def test_evenly_spaced_1d_coords_requiring_grad_get_their_gradient(spec: str) -> None:
    pe = liere.build(spec, head_dim=16, num_axes=1, seed=0).double()
    x = torch.randn(1, 1, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coords = grid_coords(6, dtype=torch.float64).requires_grad_()  # evenly spaced: the powers path reads no tensor
    pe(coords).apply(x).square().sum().backward()
    expected = torch.func.grad(lambda c: pe(c).apply(x).square().sum())(coords.detach())  # plain autograd path
    assert coords.grad is not None
    torch.testing.assert_close(coords.grad, expected, atol=1e-10, rtol=1e-10)
