"""The public contract: factory specs, coordinates, additive encodings, Rotations API and bad-input errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import liere
from liere import LearnedAbsolute, LieRE, RoPE, RoPEMixed, Rotations, SinCosAbsolute, grid_coords

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(head_dim=32, num_axes=2, num_heads=4, depth=3, dim=128, grid_shape=(4, 5))


def test_contract_from_design_doc() -> None:
    pe = LieRE(head_dim=64, num_axes=2, num_heads=12, depth=12, block_size=8)
    coords = grid_coords(14, 14)
    assert coords.shape == (196, 2)
    rot = pe(coords)
    q = torch.randn(2, 12, 196, 64)
    assert rot[5].apply(q).shape == q.shape
    assert rot.to_dense().shape[-3:] == (196, 64, 64)
    assert pe.skew_generators().shape == (12, 12, 2, 64, 64)
    built = liere.build("liere8", head_dim=64, num_axes=2, num_heads=12, depth=12)
    assert isinstance(built, LieRE) and built.block_size == 8


@pytest.mark.parametrize(
    ("spec", "kind", "attrs"),
    [
        ("none", liere.NoPE, {}),
        ("abs", LearnedAbsolute, {"grid_shape": (4, 5)}),
        ("sincos", SinCosAbsolute, {"dim": 128}),
        ("axial-rope", liere.AxialRoPE, {"theta": 100.0}),
        ("axial-rope:theta=10", liere.AxialRoPE, {"theta": 10.0}),
        ("rope-mixed", RoPEMixed, {"theta": 10.0}),
        ("liere", LieRE, {"block_size": 8}),
        ("liere4", LieRE, {"block_size": 4}),
        ("LieRE32:init=uniform", LieRE, {"block_size": 32, "init": "uniform"}),
        ("liere8:rot_dim=16,method=exact", LieRE, {"rot_dim": 16, "method": "exact"}),
    ],
)
def test_factory_builds_every_spec(spec: str, kind: type, attrs: dict) -> None:
    pe = liere.build(spec, **COMMON)
    assert isinstance(pe, kind)
    for name, value in attrs.items():
        assert getattr(pe, name) == value
    coords = grid_coords(4, 5)
    rot = pe(coords, num_prefix_tokens=1)
    q = torch.randn(2, 4, 21, 32)
    assert rot.for_layer(2).apply(q).shape == q.shape
    assert pe.add_to_tokens(torch.randn(2, 20, 128), coords).shape == (2, 20, 128)


def test_factory_keyword_options_override_spec_and_rope_is_1d() -> None:
    assert liere.build("liere8:init=uniform", head_dim=16, num_axes=2, init="normal").init == "normal"
    assert isinstance(liere.build("rope", head_dim=16), RoPE)
    with pytest.raises(ValueError, match="num_axes=2"):
        liere.build("rope", head_dim=16, num_axes=2)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("liere8:init=normal,init=rope", ValueError, "option 'init' is given twice"),
        ("liere8:block_size=16", ValueError, "option block_size=16 conflicts with block_size=8 given by the name"),
        ("comrope-ap8:variant=ld", ValueError, "option variant='ld' conflicts with variant='ap'"),
        ("liere8:seed=abc", TypeError, "option seed='abc' must be of type int \\| None"),
        ("liere8:recompute=1", TypeError, "option recompute=1 must be of type bool \\| None"),
        ("liere8:init=3", TypeError, "option init=3 must be of type str"),
        ("rope-mixed:theta=high", TypeError, "option theta='high' must be of type float \\| None"),
        ("rope:theta=abc", TypeError, "option theta='abc' must be of type float"),  # through the 1D builder
        ("abs:init_std=x", TypeError, "option init_std='x' must be of type float"),
    ],
)
def test_spec_options_refused_when_repeated_conflicting_or_mistyped(spec: str, error: type, message: str) -> None:
    num_axes = 1 if spec.startswith("rope:") else 2
    with pytest.raises(error, match=message):
        liere.build(spec, head_dim=32, num_axes=num_axes, dim=64, grid_shape=(4, 4))


def test_spec_options_typed_values_pass() -> None:
    pe = liere.build("liere:block_size=16,theta=3,seed=none,recompute=false", head_dim=32, num_axes=2)
    assert (pe.block_size, pe.theta, pe.seed, pe.recompute) == (16, 3, None, False)


def test_spec_lists_split_only_where_a_new_spec_begins() -> None:
    split = liere.factory.split_specs
    assert split("axial-rope,liere8:init=uniform,rot_dim=16") == ["axial-rope", "liere8:init=uniform,rot_dim=16"]
    assert split(" none, liere8 ,") == ["none", "liere8"]  # the old comma lists split as before
    assert split("liere8:init=uniform,rot_dim=16@unit,rope") == ["liere8:init=uniform,rot_dim=16@unit", "rope"]
    assert split("rope;liere8:rot_dim=8,init=uniform;") == ["rope", "liere8:rot_dim=8,init=uniform"]
    for spec in split("axial-rope,liere8:init=uniform,rot_dim=16"):
        liere.build(spec, head_dim=32, num_axes=2)
    with pytest.raises(ValueError, match="'init=uniform' is an option"):
        split("init=uniform,liere8")


def test_default_comparison_comes_from_the_registry() -> None:
    assert liere.factory.default_comparison(2) == ["none", "abs", "axial-rope", "rope-mixed", "liere8", "liere64"]
    assert liere.factory.default_comparison(1) == ["none", "abs", "rope", "rope-mixed", "liere8", "liere64"]
    for name in liere.available():  # every compared spec belongs to its entry and supports its axes
        info = liere.encoding_info(name)
        assert all(info.pattern.fullmatch(liere.factory.parse_spec(s)[0]) for s in info.compare)
    with pytest.raises(ValueError, match="compare specs \\['rope'\\] do not match"):
        liere.register("mine", compare=("rope",))


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: liere.build("rotary-magic", head_dim=16), ValueError, "unknown encoding spec 'rotary-magic'"),
        (lambda: liere.build("", head_dim=16), ValueError, "spec must be a non-empty string"),
        (lambda: liere.build("liere8:init", head_dim=16), ValueError, "key=value"),
        (lambda: liere.build("liere8:colour=red", head_dim=16), TypeError, "colour"),
        (lambda: liere.build("abs", head_dim=16, num_axes=2, dim=32), ValueError, "grid_shape"),
        (lambda: liere.build("sincos", head_dim=16, num_axes=2), ValueError, "dim must be a positive int"),
        (lambda: LieRE(head_dim=30, block_size=8), ValueError, "head_dim=30 must be divisible by 8"),
        (lambda: LieRE(head_dim=32, block_size=8, rot_dim=20), ValueError, "rot_dim=20 must be divisible by 8"),
        (lambda: LieRE(head_dim=32, rot_dim=40), ValueError, "rot_dim=40 exceeds head_dim=32"),
        (lambda: LieRE(head_dim=32, block_size=1), ValueError, "block_size must be an int >= 2"),
        (lambda: LieRE(head_dim=32, init="orthogonal"), ValueError, "init must be one of"),
        (lambda: LieRE(head_dim=0), ValueError, "head_dim must be a positive int"),
        (lambda: LieRE(head_dim=32, num_heads=0), ValueError, "num_heads must be a positive int"),
        (lambda: RoPE(head_dim=31), ValueError, "head_dim=31 must be divisible by 2"),
        (lambda: liere.AxialRoPE(head_dim=30, num_axes=2, rot_dim=30), ValueError, "rot_dim=30 must be divisible by 4"),
        (lambda: liere.AxialRoPE(head_dim=2, num_axes=2), ValueError, "head_dim=2 is too small"),
        (lambda: SinCosAbsolute(dim=30, num_axes=2, head_dim=16), ValueError, "dim=30"),
        (lambda: LearnedAbsolute(dim=8, grid_shape=(4, 0), head_dim=16), ValueError, "grid_shape"),
        (lambda: grid_coords(), ValueError, "at least one grid size"),
        (lambda: grid_coords(3, 0), ValueError, "positive ints"),
        (lambda: grid_coords(3, 4, spacing=[1.0]), ValueError, "spacing has 1 entries"),
    ],
)
def test_bad_construction_raises(call, error: type, pattern: str) -> None:
    with pytest.raises(error, match=re.escape(pattern) if "(" in pattern else pattern):
        call()


@pytest.mark.parametrize(
    ("coords", "error", "pattern"),
    [
        (torch.zeros(5), ValueError, "coords must have shape"),
        (torch.zeros(2, 3, 5, 2), ValueError, "coords must have shape"),
        (torch.zeros(5, 3), ValueError, "coords has 3 axes"),
        (torch.zeros(0, 2), ValueError, "at least one position"),
        (torch.tensor([[0.0, float("nan")]]), ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("inf")]]), ValueError, "NaN or inf"),
        (torch.zeros(5, 2, dtype=torch.bool), TypeError, "dtype"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_coords_raise(coords, error: type, pattern: str) -> None:
    for pe in (LieRE(16, 2), RoPEMixed(16, 2), liere.build("sincos", head_dim=16, num_axes=2, dim=8)):
        with pytest.raises(error, match=pattern):
            pe(coords)


def test_bad_queries_raise() -> None:
    rot = LieRE(16, 2, num_heads=3, depth=2)(grid_coords(3, 3))
    with pytest.raises(ValueError, match="pick one with rot"):
        rot.apply(torch.randn(1, 3, 9, 16))
    layer = rot[0]
    for shape, pattern in [
        ((1, 3, 9, 32), "head_dim 32"),
        ((1, 4, 9, 16), "4 heads"),
        ((1, 3, 10, 16), "10 tokens"),
        ((3, 9, 16), r"\(batch, heads, n, head_dim\)"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            layer.apply(torch.randn(shape))
    per_sample = LieRE(16, 2)(torch.randn(2, 9, 2))
    with pytest.raises(ValueError, match="batch 3"):
        per_sample.apply(torch.randn(3, 1, 9, 16))
    with pytest.raises(IndexError, match="out of range"):
        rot[2]
    with pytest.raises(ValueError, match="9 tokens but k only 8"):
        liere.rotary_attention(torch.randn(1, 3, 9, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), layer)


def test_axial_rope_rounds_default_rot_dim_down() -> None:
    pe = liere.AxialRoPE(head_dim=64, num_axes=3)
    assert pe.rot_dim == 60
    q = torch.randn(1, 1, 8, 64)
    out = pe(grid_coords(2, 2, 2)).apply(q)
    assert torch.equal(out[..., 60:], q[..., 60:])


def test_grid_coords_order_and_spacing() -> None:
    coords = grid_coords(2, 3, 4)
    assert coords.shape == (24, 3)
    image = torch.arange(24).reshape(2, 3, 4)
    for row, (t, i, j) in enumerate(coords.long().tolist()):
        assert image[t, i, j] == row  # row-major, like conv_out.flatten(2)
    unit = grid_coords(5, 3, spacing=[0.25, 0.5])
    assert unit.max(0).values.tolist() == [1.0, 1.0]


def test_learned_absolute_indexes_table_and_clamps_outside() -> None:
    pe = LearnedAbsolute(dim=6, grid_shape=(3, 4), head_dim=8)
    x = torch.zeros(1, 12, 6)
    out = pe.add_to_tokens(x, grid_coords(3, 4))
    expected = pe.table[0].flatten(1).T  # (12, dim), row-major
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-6)
    far = pe.add_to_tokens(torch.zeros(1, 1, 6), torch.tensor([[10.0, 10.0]]))
    torch.testing.assert_close(far[0, 0], pe.table[0, :, 2, 3])
    line = LearnedAbsolute(dim=4, grid_shape=(5,), head_dim=8)
    torch.testing.assert_close(line.add_to_tokens(torch.zeros(1, 5, 4), grid_coords(5))[0], line.table[0].T)
    out.sum().backward()
    assert pe.table.grad is not None and pe.table.grad.abs().sum() > 0


def test_sincos_embedding_values() -> None:
    pe = SinCosAbsolute(dim=8, num_axes=2, head_dim=8)
    out = pe.add_to_tokens(torch.zeros(1, 1, 8), torch.tensor([[1.0, 2.0]]))[0, 0]
    omega = torch.tensor([1.0, 0.01])  # 10000 ** (-k / 2)
    expected = torch.cat([torch.sin(omega), torch.cos(omega), torch.sin(2 * omega), torch.cos(2 * omega)])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="do not match tokens"):
        pe.add_to_tokens(torch.zeros(1, 3, 8), grid_coords(2, 2))


def test_rotations_identity_and_to() -> None:
    ident = Rotations.identity(16, 5).with_prefix(1)
    x = torch.randn(2, 3, 6, 16)
    assert ident.apply(x) is x and ident.num_positions == 6
    torch.testing.assert_close(ident.to_dense()[0, 0, 0], torch.eye(16).expand(6, 16, 16))
    rot = LieRE(16, 2, block_size=4)(grid_coords(2, 2)).to(torch.float64)
    assert rot.dtype == torch.float64 and rot.apply(torch.randn(1, 1, 4, 16)).dtype == torch.float32
    assert "block_size=4" in repr(rot) and len(rot) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("page", "marker"), [("README.md", "example"), ("docs/models.md", "decoding example")])
def test_readme_example_runs(page: str, marker: str) -> None:
    """The README's usage example and the cached ``generate`` example of docs/models.md are executed verbatim."""
    text = (ROOT / page).read_text()
    example = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert example is not None, f"{page} lost its marked {marker}"
    result = subprocess.run([sys.executable, "-c", example.group(1)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
