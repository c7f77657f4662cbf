"""The contract every registered encoding keeps, for every number of axes it supports (``liere.available()``):
orthogonal rotations, ``apply == to_dense @ x``, unrotated prefix tokens, ``no_weight_decay`` = its parameters,
gradients to every parameter, finite bf16, ``torch.compile``, ``Grid == tensor``, ``inference_mode``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import liere
import liere.factory
from liere import Grid, PositionEncoding

HEAD_DIM, DIM, HEADS, DEPTH = 24, 48, 2, 2  # 24: divisible by 8 (liere8), 4 (mixed) and 6 (axial over 3 axes)
SHAPES = {1: (7,), 2: (3, 4), 3: (2, 2, 3)}
CASES = [(name, axes) for name in liere.available() for axes in liere.encoding_info(name).axes]


def build(name: str, axes: int) -> tuple[PositionEncoding, Grid]:
    torch.manual_seed(0)
    grid = Grid(SHAPES[axes], spacing=0.5, offset=1.0)
    info = liere.encoding_info(name)
    kwargs = dict(head_dim=HEAD_DIM, num_axes=axes, num_heads=HEADS, depth=DEPTH, dim=DIM, grid_shape=grid.shape)
    return liere.build(info.example, **kwargs), grid


def rotated(pe: PositionEncoding, coords: torch.Tensor | Grid, x: torch.Tensor) -> torch.Tensor:
    """Every layer's rotations applied to ``x`` ``(batch, heads, 1 + n, head_dim)`` (one prefix token)."""
    rot = pe(coords, num_prefix_tokens=1)
    return torch.stack([rot.for_layer(i).apply(x) for i in range(DEPTH)])


def queries(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, HEADS, 1 + n, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_rotations_are_orthogonal_and_apply_as_dense(name: str, axes: int) -> None:
    pe, grid = build(name, axes)
    rot = pe(grid, num_prefix_tokens=1)
    dense = rot.to_dense()  # (depth, S, H, 1 + n, d, d)
    eye = torch.eye(HEAD_DIM)
    torch.testing.assert_close(dense.mT @ dense, eye.expand_as(dense), atol=5e-5, rtol=0)
    torch.testing.assert_close(dense[:, :, :, 0], eye.expand_as(dense[:, :, :, 0]))  # the prefix token
    x = queries(grid.num_positions)
    for i in range(rot.depth):
        matrices = dense[i if rot.depth > 1 else 0, 0]  # (H, 1 + n, d, d)
        expected = (matrices @ x.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(rot.for_layer(i).apply(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_parameters_are_named_for_no_decay_and_all_get_gradients(name: str, axes: int) -> None:
    pe, grid = build(name, axes)
    names = {n for n, _ in pe.named_parameters()}
    assert pe.no_weight_decay() == names
    assert bool(names) == liere.encoding_info(name).learned
    if not names:
        return
    tokens = torch.randn(2, grid.num_positions, DIM, generator=torch.Generator().manual_seed(2))
    loss = rotated(pe, grid, queries(grid.num_positions)).square().mul(torch.arange(HEAD_DIM)).sum()
    (loss + pe.add_to_tokens(tokens, grid).square().sum()).backward()
    for param_name, param in pe.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_grid_equals_tensor_bf16_and_inference_mode(name: str, axes: int) -> None:
    pe, grid = build(name, axes)
    x = queries(grid.num_positions)
    with torch.no_grad():
        expected = rotated(pe, grid, x)
        torch.testing.assert_close(rotated(pe, grid.coords(), x), expected, atol=0, rtol=0)
        tokens = torch.randn(2, grid.num_positions, DIM)
        torch.testing.assert_close(pe.add_to_tokens(tokens, grid.coords()), pe.add_to_tokens(tokens, grid))
    with torch.inference_mode():
        torch.testing.assert_close(rotated(pe, grid, x), expected, atol=0, rtol=0)
        low = rotated(pe.to(torch.bfloat16), grid, x.bfloat16())
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "axes"), CASES)
def test_compiles_without_graph_breaks(name: str, axes: int) -> None:
    pe, grid = build(name, axes)
    x = queries(grid.num_positions)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: rotated(pe, grid, x), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), rotated(pe, grid, x), atol=1e-5, rtol=0)


def registry_table() -> str:
    """The README's encoding table, generated from the registry."""
    rows = ["| spec | encoding | axes | learned |", "|---|---|---|---|"]
    for name in liere.available():
        info = liere.encoding_info(name)
        axes, learned = ", ".join(map(str, info.axes)), "yes" if info.learned else "no"
        rows.append(f"| `{name}` | {info.help} | {axes} | {learned} |")
    return "\n".join(rows) + "\n"


def test_registry_metadata_and_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert registry_table() in readme, "README's encoding table differs from the registry:\n" + registry_table()
    for name in liere.available():
        info = liere.encoding_info(name)
        assert info.help and info.pattern.fullmatch(info.example), name
    with pytest.raises(ValueError, match="unknown encoding"):
        liere.encoding_info("nope")
    with pytest.raises(ValueError, match="does not match the pattern"):
        liere.register("mine", example="yours")


def test_contributing_example_is_one_file_plus_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    module, line = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    monkeypatch.setattr(liere.factory, "_REGISTRY", dict(liere.factory._REGISTRY))  # restored after the test
    namespace: dict[str, object] = {}
    exec(module, namespace)
    exec(line, {"register": liere.register, **namespace})
    assert "learned-rope" in liere.available() and liere.encoding_info("learned-rope").learned
    test_rotations_are_orthogonal_and_apply_as_dense("learned-rope", 1)
    test_parameters_are_named_for_no_decay_and_all_get_gradients("learned-rope", 1)
    test_grid_equals_tensor_bf16_and_inference_mode("learned-rope", 1)
    from tests.test_meta import test_encoding_built_on_meta_resets_to_a_normal_build

    test_encoding_built_on_meta_resets_to_a_normal_build("learned-rope", 1)


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_huge_coordinates_give_finite_rotations_or_one_error_naming_coords(name: str, axes: int) -> None:
    pe, grid = build(name, axes)
    coords = grid.coords()
    limit = liere.coords.coordinate_limit(torch.float32)
    for scale in (1e18, limit / coords.abs().max().item() * 0.99):  # up to the limit: every rotation finite
        assert torch.isfinite(rotated(pe, coords * scale, queries(grid.num_positions))).all()
    for huge in (coords * 3e38 / coords.abs().max(), coords * 1e20):
        with pytest.raises(ValueError, match=r"^coords contain NaN or inf or \|coordinate\| > 1.84e\+19"):
            pe(huge)
    with pytest.raises(ValueError, match=r"^coords: the grid reaches \|coordinate\| = [0-9.]+e\+38, beyond 1.84e\+19"):
        pe(Grid(grid.shape, spacing=1e38, offset=5e37))


def _central_difference(f, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
    eps = 1e-6
    plus = f(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
    minus = f(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_forward_mode_ad_matches_finite_differences_in_float64(name: str, axes: int) -> None:
    """``torch.func.jvp`` and autograd's dual tensors w.r.t. coordinates and parameters; ``jacfwd`` and ``hessian``."""
    import torch.autograd.forward_ad as fwAD

    pe, grid = build(name, axes)
    pe = pe.double()
    coords = grid.coords(dtype=torch.float64)
    x = queries(grid.num_positions, torch.float64)
    params = {k: v.detach() for k, v in pe.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in (coords, *params.values()))

    def f(c: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        rot = torch.func.functional_call(pe, dict(zip(params, values, strict=True)), (c,), {"num_prefix_tokens": 1})
        return rot.for_layer(DEPTH - 1).apply(x[:, :, : 1 + c.shape[0]])

    primals = (coords, *params.values())
    expected = _central_difference(f, primals, tangents)
    torch.testing.assert_close(torch.func.jvp(f, primals, tangents)[1], expected, atol=1e-6, rtol=1e-6)
    with fwAD.dual_level():
        dual = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        tangent = fwAD.unpack_dual(dual).tangent  # None: the output does not depend on them (additive encodings)
        torch.testing.assert_close(
            torch.zeros_like(dual) if tangent is None else tangent, expected, atol=1e-6, rtol=1e-6
        )

    few, t = coords[:2], tangents[0][:2]  # jacfwd and hessian w.r.t. the coordinates of two positions

    def energy(c: torch.Tensor) -> torch.Tensor:
        return f(c, *params.values()).square().sum()

    jacobian = torch.func.jacfwd(lambda c: f(c, *params.values()))(few)
    torch.testing.assert_close(
        (jacobian * t).sum((-2, -1)),
        _central_difference(f, (few, *params.values()), (t, *(torch.zeros_like(v) for v in params.values()))),
        atol=1e-6,
        rtol=1e-6,
    )
    hessian = torch.func.hessian(energy)(few).flatten(0, 1).flatten(1)
    torch.testing.assert_close(hessian, hessian.T, atol=1e-6, rtol=1e-6)
    along = _central_difference(torch.func.grad(energy), (few,), (t,)).flatten()
    torch.testing.assert_close(hessian @ t.flatten(), along, atol=1e-5, rtol=1e-5)
