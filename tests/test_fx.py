"""``torch.fx`` symbolic tracing of every registered encoding, ``models.ViT`` and the adapted timm ViT: traced graphs
compute exactly the eager outputs; torchvision's ``create_feature_extractor`` and timm's FX feature test work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import liere
from liere import Grid, grid_coords
from models import ViT

timm = pytest.importorskip("timm")
feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
from timm.layers import get_notrace_functions, get_notrace_modules  # noqa: E402

from liere.integrations.timm import liere_timm_vit  # noqa: E402

SPECS_2D = [liere.encoding_info(n).example for n in liere.available() if 2 in liere.encoding_info(n).axes]
CASES = [(liere.encoding_info(n).example, axes) for n in liere.available() for axes in liere.encoding_info(n).axes]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HEAD_DIM = 24  # divisible by 8 (liere8), 4 (mixed) and 6 (axial over 3 axes)


def tiny_vit(spec: str) -> ViT:
    torch.manual_seed(0)
    return ViT((3, 32, 32), 5, 8, encoding=spec, dim=48, depth=2, heads=2).eval()


def tiny_timm(spec: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=5, embed_dim=48, num_heads=2)
    return liere_timm_vit("vit_tiny_patch16_224", spec, create_kwargs=kwargs).eval()


class Rotate(nn.Module):
    """Every layer's rotations of an encoding applied to ``q``: on a fixed ``Grid`` and on coordinates passed in."""

    def __init__(self, spec: str, axes: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.grid = Grid(shape)
        self.pe = liere.build(spec, head_dim=HEAD_DIM, num_axes=axes, num_heads=2, depth=2, dim=48, grid_shape=shape)

    def forward(self, coords: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        on_grid, given = self.pe(self.grid, num_prefix_tokens=1), self.pe(coords, num_prefix_tokens=1)
        return torch.stack([r.for_layer(i).apply(q) for r in (on_grid, given) for i in range(2)])


@pytest.mark.parametrize(("spec", "axes"), CASES)
def test_symbolic_trace_of_every_encoding_equals_eager(spec: str, axes: int) -> None:
    shape = {1: (6,), 2: (2, 3), 3: (1, 2, 3)}[axes]
    torch.manual_seed(0)
    model = Rotate(spec, axes, shape)
    coords, q = grid_coords(*shape) * 0.5 + 1, torch.randn(2, 2, 7, HEAD_DIM)
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(coords, q), model(coords, q))


@pytest.mark.parametrize("spec", SPECS_2D)
@pytest.mark.parametrize("make", [tiny_vit, tiny_timm], ids=["vit", "timm"])
def test_symbolic_trace_of_models_equals_eager(make, spec: str) -> None:
    model = make(spec)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(IMAGES), model(IMAGES))


@pytest.mark.parametrize("spec", ["axial-rope", "liere8"])
def test_a_traced_model_follows_casts_like_the_eager_one(spec: str) -> None:
    """Nothing is frozen into the graph: the encoding runs at run time on the cast model's parameters and buffers."""
    model = tiny_vit(spec)
    traced = torch.fx.symbolic_trace(model).double()
    with torch.no_grad():
        assert torch.equal(traced(IMAGES.double()), model.double()(IMAGES.double()))


def timm_fx_model(model: nn.Module, train: bool) -> nn.Module:
    """timm's ``_create_fx_model`` (tests/test_models.py): the last node of the train and eval graphs, traced with
    timm's leaf modules and functions and constant parameter shapes."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    kwargs["param_shapes_constant"] = True
    train_nodes, eval_nodes = feature_extraction.get_graph_node_names(model, tracer_kwargs=kwargs)
    last = dict(train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]])
    return feature_extraction.create_feature_extractor(model.train(train), **last, tracer_kwargs=kwargs)


@pytest.mark.parametrize("spec", SPECS_2D)
def test_timm_model_forward_and_backward_fx(spec: str) -> None:
    """timm's ``test_model_forward_fx`` (outputs equal) and ``test_model_backward_fx`` (every parameter gets a
    gradient) on the adapted model."""
    model = tiny_timm(spec)
    with torch.inference_mode():
        expected = model(IMAGES[:1])
        fx_model = timm_fx_model(model, train=False)
        assert torch.equal(torch.cat(tuple(fx_model(IMAGES[:1]).values())), expected)
    fx_model = timm_fx_model(model, train=True)
    torch.cat(tuple(fx_model(IMAGES).values())).mean().backward()
    assert [n for n, p in fx_model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(("make", "prefix"), [(tiny_timm, "blocks.1"), (tiny_vit, "transformer.blocks.1")])
def test_create_feature_extractor_gives_intermediate_features(make, prefix: str) -> None:
    model = make("liere8")
    extractor = feature_extraction.create_feature_extractor(model, {f"{prefix}.attn": "attn"})
    seen = []
    model.get_submodule(f"{prefix}.attn").register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        model(IMAGES)
        assert torch.equal(extractor(IMAGES)["attn"], seen[0])


def test_rotations_internals_are_refused_with_a_clear_error_while_tracing() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pe = liere.build("liere8", head_dim=HEAD_DIM, num_axes=2)

        def forward(self, coords: torch.Tensor) -> torch.Tensor:
            return self.pe(coords).to_dense()

    with pytest.raises(AttributeError, match="to_dense is not available while torch.fx traces"):
        torch.fx.symbolic_trace(Dense())


def test_untraceable_timm_options_are_refused() -> None:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=1, num_classes=5, embed_dim=48, num_heads=2)
    dynamic = liere_timm_vit("vit_tiny_patch16_224", "liere8", create_kwargs=kwargs | {"dynamic_img_size": True})
    with pytest.raises(NotImplementedError, match="dynamic_img_size=False"):
        torch.fx.symbolic_trace(dynamic)
    augmented = liere_timm_vit("vit_tiny_patch16_224", "liere8", create_kwargs=kwargs, shift_coords=0.5)
    with pytest.raises(NotImplementedError, match="shift_coords"):
        torch.fx.symbolic_trace(augmented.train())
    torch.fx.symbolic_trace(augmented.eval())  # no augmentation in eval mode
