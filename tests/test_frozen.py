"""Frozen rotations (``liere.freeze``): equal to the unfrozen encoding bit for bit, for every registered encoding;
refused for other coordinates and for training; state dict, copies, casts; models and adapters freeze in one call;
``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` of a frozen ViT compute no exponential."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import liere
from liere import Grid, PositionEncoding
from models import ViT
from models.lm import CharLM

HEAD_DIM, DIM, HEADS, DEPTH = 24, 48, 2, 2
SHAPES = {1: (7,), 2: (3, 4), 3: (2, 2, 3)}
CASES = [
    (liere.encoding_info(name).example, axes) for name in liere.available() for axes in liere.encoding_info(name).axes
]


def build(spec: str, axes: int) -> tuple[PositionEncoding, Grid]:
    """The encoding of ``spec`` (eval mode) and a grid it serves."""
    torch.manual_seed(0)
    grid = Grid(SHAPES[axes], spacing=0.5, offset=1.0)
    kwargs = dict(head_dim=HEAD_DIM, num_axes=axes, num_heads=HEADS, depth=DEPTH, dim=DIM, grid_shape=grid.shape)
    return liere.build(spec, **kwargs).eval(), grid


def rotated(pe: PositionEncoding, coords: object, n: int) -> torch.Tensor:
    """Every layer's rotations (one prefix token) applied to fixed queries."""
    x = torch.randn(2, HEADS, 1 + n, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rot = pe(coords, num_prefix_tokens=1)
        return torch.stack([rot.for_layer(i).apply(x) for i in range(DEPTH)])


def stored(pe: PositionEncoding, coords: object) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return pe(coords, num_prefix_tokens=1).tensors()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("spec", "axes"), CASES)
def test_frozen_equals_eager_bitwise(spec: str, axes: int) -> None:
    pe, grid = build(spec, axes)
    eager, eager_out = stored(pe, grid), rotated(pe, grid, grid.num_positions)
    liere.freeze(pe, grid)
    assert_same(stored(pe, grid), eager)
    assert torch.equal(rotated(pe, grid, grid.num_positions), eager_out)
    assert all(not key.startswith("frozen_") for key in pe.state_dict())
    with pytest.raises(ValueError, match="is frozen for Grid"):
        pe(Grid(SHAPES[axes]))  # another spacing and offset
    liere.unfreeze(pe)
    assert not any(name.startswith("frozen_") for name, _ in pe.named_buffers())
    assert_same(stored(pe, Grid(SHAPES[axes])), stored(build(spec, axes)[0], Grid(SHAPES[axes])))


@pytest.mark.parametrize("spec", [spec for spec, axes in CASES if axes == 1])
def test_1d_table_serves_every_position_inside_it(spec: str) -> None:
    pe, _ = build(spec, 1)
    eager = copy.deepcopy(pe)
    liere.freeze(pe, Grid((40,)))
    requests = [Grid((40,)), Grid((9,)), Grid((1,), offset=17.0), Grid((5,), offset=35.0)]
    requests += [torch.tensor([[3], [7], [39]]), torch.tensor([[[3], [7]], [[0], [1]]]), torch.tensor([[[2], [5]]] * 2)]
    for coords in requests:
        assert_same(stored(pe, coords), stored(eager, coords))
    for coords in (Grid((41,)), Grid((1,), offset=40.0), Grid((3,), offset=0.5), torch.tensor([[40]])):
        with pytest.raises(ValueError, match="frozen for positions 0..39"):
            pe(coords)
    with pytest.raises(ValueError, match="is frozen for Grid"):
        pe(torch.zeros(3, 1))  # float coordinates: only the frozen ones


def test_tensor_coords_and_the_last_eval_coords() -> None:
    pe, _ = build("liere8", 2)
    with pytest.raises(ValueError, match="has not run in eval mode"):
        liere.freeze(pe)
    coords = torch.rand(2, 5, 2)
    expected = stored(pe, coords)
    liere.freeze(pe)  # at the coordinates it last ran with
    assert_same(stored(pe, coords.clone()), expected)
    coords[0, 0, 0] += 1  # freezing copied them: an edit of the caller's tensor is another request
    for other in (coords, coords[:1], coords.double(), Grid((2, 5))):
        with pytest.raises(ValueError, match="is frozen for coordinates of shape"):
            pe(other)
    with pytest.raises(TypeError, match="grid must be a liere.Grid"):
        liere.freeze(pe, (3, 4))
    with pytest.raises(ValueError, match="holds no liere position encoding"):
        liere.freeze(torch.nn.Linear(2, 2), Grid((3,)))


def test_freeze_is_all_or_nothing() -> None:
    model = torch.nn.ModuleList([build("liere8", 2)[0], build("rope", 1)[0]])
    with pytest.raises(ValueError, match="axes"):
        liere.freeze(model, Grid((3, 4)))  # the 1D RoPE cannot take a 2D grid
    assert all(liere.frozen.frozen_state(pe) is None for pe in model)


def test_training_a_frozen_encoding_is_refused() -> None:
    pe, grid = build("liere8", 2)
    liere.freeze(pe, grid)
    with pytest.raises(RuntimeError, match="call liere.unfreeze"):
        pe.train()(grid)
    pe.eval()
    with torch.no_grad():
        pe.generators.add_(0.1)  # an optimizer step
    with pytest.raises(RuntimeError, match="weights changed after liere.freeze"):
        pe(grid)
    liere.freeze(pe, grid)
    pe.train()
    pe.requires_grad_(False)
    pe(grid)  # nothing to train: served
    fixed, grid = build("axial-rope", 2)
    liere.freeze(fixed, grid).train()(grid)


def test_state_dict_copies_and_casts() -> None:
    pe, grid = build("liere8", 2)
    liere.freeze(pe, grid)
    other, _ = build("liere8", 2)
    with torch.no_grad():
        other.generators.mul_(0.5)
    pe.load_state_dict(other.state_dict())  # frozen rotations follow the loaded weights
    assert_same(stored(pe, grid), stored(other, grid))
    fresh, _ = build("liere8", 2)
    fresh.load_state_dict(pe.state_dict())  # nothing frozen in the state dict: loads into an unfrozen encoding
    assert_same(stored(fresh, grid), stored(other, grid))
    buffer = io.BytesIO()
    torch.save(pe, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(pe), torch.load(buffer, weights_only=False)):
        assert_same(stored(twin, grid), stored(other, grid))
        with pytest.raises(ValueError, match="is frozen"):
            twin(Grid((4, 3)))
    for dtype in (torch.float64, torch.bfloat16):
        cast, reference = copy.deepcopy(pe).to(dtype), copy.deepcopy(other).to(dtype)
        assert_same(stored(cast, grid), stored(reference, grid))


# ----------------------------------------------------------------------------------- models and adapters
def tiny_vit(encoding: str = "liere8") -> ViT:
    torch.manual_seed(0)
    return ViT((3, 16, 16), num_classes=3, patch_size=4, encoding=encoding, dim=32, depth=2, heads=2).eval()


def unused_parameters(graph: torch.fx.Graph, names: set[str]) -> bool:
    """Whether no placeholder or attribute whose name ends in one of ``names`` is used by the graph."""
    nodes = [n for n in graph.nodes if n.op in ("placeholder", "get_attr") and any(s in n.name for s in names)]
    return bool(nodes) and all(not n.users for n in nodes)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_frozen_vit_compiles_exports_and_traces_to_constants() -> None:
    model, images = tiny_vit(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        model.freeze_rotations()
        assert torch.equal(model(images), expected)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(images), expected, rtol=0, atol=1e-5)
        exported = torch.export.export(model, (images,))
        assert unused_parameters(exported.graph, {"generators"})  # no exponential: the generators are not read
        torch.testing.assert_close(exported.module()(images), expected, rtol=0, atol=1e-5)
        traced = torch.jit.trace(model, (images,))
        torch.testing.assert_close(traced(images), expected, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="is frozen for Grid"):
            model(torch.randn(1, 3, 20, 20))


def test_frozen_charlm_generates_as_unfrozen() -> None:
    torch.manual_seed(0)
    model = CharLM(20, context=16, encoding="liere8", dim=32, depth=2, heads=2).eval()
    prompt = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, 8, temperature=0)
    logits = model(prompt)
    model.freeze_rotations()
    assert torch.equal(model(prompt), logits)
    assert torch.equal(model.generate(prompt, 8, temperature=0), expected)
    with pytest.raises(ValueError, match="frozen for positions 0..15"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_frozen_timm_and_x_transformers_match_unfrozen() -> None:
    timm_integration = pytest.importorskip("liere.integrations.timm")
    xt = pytest.importorskip("x_transformers")
    from liere.integrations.x_transformers import liere_x_transformers

    torch.manual_seed(0)
    vit = timm_integration.liere_timm_vit(
        "vit_tiny_patch16_224", "liere8", create_kwargs=dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    )
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="model.eval"):
        vit.freeze_rotations()
    with torch.no_grad():
        expected = vit.eval()(images)
        assert torch.equal(vit.freeze_rotations()(images), expected)
    torch.manual_seed(0)
    decoder = xt.Decoder(dim=32, depth=2, heads=2, attn_dim_head=16)
    lm = xt.TransformerWrapper(num_tokens=20, max_seq_len=32, use_abs_pos_emb=False, attn_layers=decoder)
    liere_x_transformers(lm, "liere8")
    tokens = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        expected = lm.eval()(tokens)
        liere.freeze(lm, Grid((32,)))  # a position table up to max_seq_len
        assert torch.equal(lm(tokens), expected)
