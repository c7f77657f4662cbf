"""Every registered encoding under ``torch.func`` (per-sample gradients with ``vmap``, ensembles with
``functional_call``), second-order gradients (``create_graph=True``) checked against finite differences and the plain
``torch.linalg.matrix_exp``, and empty batches of per-sample coordinates."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import liere
from liere import Grid, PositionEncoding

HEAD_DIM, HEADS, DEPTH, DIM = 48, 2, 2, 96  # 48: divisible by 16 (liere16) and 6 (axial over 3 axes)
SHAPES = {1: Grid((5,), spacing=0.7, offset=0.5), 2: Grid((2, 3), spacing=0.7, offset=0.5)}
# every registry entry (its example, 2D where supported), plus the recompute paths: chunked 2D and 1D powers
INFOS = [liere.encoding_info(n) for n in liere.available()]
CASES = [(i.example, 2 if 2 in i.axes else 1) for i in INFOS] + [("liere16", 2), ("liere16", 1)]
LEARNED = [(i.example, 2 if 2 in i.axes else 1) for i in INFOS if i.learned] + [("liere16", 2), ("liere16", 1)]
EMPTY_CASES = [(i.example, axes) for i in INFOS for axes in i.axes]


def encoding(spec: str, axes: int, seed: int = 0) -> PositionEncoding:
    torch.manual_seed(seed)
    sizes = dict(head_dim=HEAD_DIM, num_axes=axes, num_heads=HEADS, depth=DEPTH, dim=DIM, grid_shape=(3,) * axes)
    return liere.build(spec, **sizes).double()


def queries(batch: int, n: int) -> torch.Tensor:
    return torch.randn(batch, HEADS, n, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class CubicLoss(nn.Module):
    """A loss with nonzero second derivatives in every parameter: ``sum (R x)^3`` over layers plus ``sum t^3`` of
    the tokens ``x`` (heads merged) with the encoding's additive embedding."""

    def __init__(self, pe: PositionEncoding) -> None:
        super().__init__()
        self.pe = pe

    def forward(self, coords: Grid | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rot = self.pe(coords)
        tokens = self.pe.add_to_tokens(x.transpose(1, 2).flatten(2), coords)
        return sum((rot.for_layer(i).apply(x) ** 3).sum() for i in range(DEPTH)) + (tokens**3).sum()


@pytest.mark.parametrize(("spec", "axes"), LEARNED)
def test_per_sample_gradients_with_vmap_equal_a_loop(spec: str, axes: int) -> None:
    loss, grid = CubicLoss(encoding(spec, axes)), SHAPES[axes]
    params = {k: v.detach() for k, v in loss.named_parameters()}
    x = queries(3, grid.num_positions)
    per_sample = vmap(grad(lambda p, xi: functional_call(loss, p, (grid, xi[None]))), in_dims=(None, 0))(params, x)
    for i in range(3):
        expected = torch.autograd.grad(loss(grid, x[i : i + 1]), loss.parameters())
        for (name, _), g in zip(loss.named_parameters(), expected, strict=True):
            torch.testing.assert_close(per_sample[name][i], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("spec", "axes"), LEARNED)
def test_functional_call_ensemble_equals_each_member(spec: str, axes: int) -> None:
    models = [CubicLoss(encoding(spec, axes, seed)) for seed in (0, 1)]
    grid = SHAPES[axes]
    x = queries(2, grid.num_positions)
    params, buffers = stack_module_state(models)
    ensemble = vmap(lambda p, b: functional_call(models[0], (p, b), (grid, x)))(params, buffers)
    torch.testing.assert_close(ensemble, torch.stack([model(grid, x) for model in models]), rtol=1e-10, atol=0)


@pytest.mark.parametrize(("spec", "axes"), CASES)
def test_vmap_over_per_sample_coordinates_equals_the_batched_call(spec: str, axes: int) -> None:
    pe, grid = encoding(spec, axes), SHAPES[axes]
    x = queries(2, grid.num_positions)
    coords = grid.coords(dtype=torch.float64) + torch.rand(2, grid.num_positions, axes, dtype=torch.float64)
    per_sample = vmap(lambda c, xi: pe(c).for_layer(0).apply(xi[None])[0])(coords, x)
    expected = pe(coords).for_layer(0).apply(x)  # per-sample coordinates, batched by the library
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=1e-12)


def hessian_vector_product(loss: CubicLoss, grid: Grid, x: torch.Tensor, v: list[torch.Tensor]) -> tuple:
    params = list(loss.parameters())
    g = torch.autograd.grad(loss(grid, x), params, create_graph=True)
    return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True)), params)


@pytest.mark.parametrize(("spec", "axes"), LEARNED)
def test_second_order_gradients_match_finite_differences(spec: str, axes: int) -> None:
    loss, grid = CubicLoss(encoding(spec, axes)), SHAPES[axes]
    x = queries(2, grid.num_positions)
    v = [torch.randn_like(p) for p in loss.parameters()]
    hvp = hessian_vector_product(loss, grid, x, v)

    def gradient_at(step: float) -> tuple[torch.Tensor, ...]:
        moved = CubicLoss(encoding(spec, axes))
        with torch.no_grad():
            for p, vi in zip(moved.parameters(), v, strict=True):
                p.add_(step * vi)
        return torch.autograd.grad(moved(grid, x), moved.parameters())

    eps = 1e-5
    for h, plus, minus in zip(hvp, gradient_at(eps), gradient_at(-eps), strict=True):
        fd = (plus - minus) / (2 * eps)
        torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


@pytest.mark.parametrize("block_size", [8, 16])
def test_liere_second_order_gradients_equal_the_matrix_exp_reference(block_size: int) -> None:
    """``"taylor_cans"`` (and its chunked recompute at b=16) against ``torch.linalg.matrix_exp``'s plain autograd."""
    grid, x = SHAPES[2], queries(2, 6)
    auto, exact = (CubicLoss(encoding(f"liere{block_size}:method={m}", 2)) for m in ("auto", "exact"))
    v = [torch.randn_like(p) for p in auto.parameters()]
    for a, e in zip(hessian_vector_product(auto, grid, x, v), hessian_vector_product(exact, grid, x, v), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("spec", "axes"), EMPTY_CASES)
def test_an_empty_batch_gives_empty_results(spec: str, axes: int) -> None:
    pe = encoding(spec, axes).float()
    coords = torch.zeros(0, 4, axes)
    rot = pe(coords, num_prefix_tokens=1)
    out = [rot.for_layer(i).apply(torch.zeros(0, HEADS, 5, HEAD_DIM)) for i in range(DEPTH)]
    assert [o.shape for o in out] == [(0, HEADS, 5, HEAD_DIM)] * DEPTH
    assert pe.add_to_tokens(torch.zeros(0, 4, DIM), coords).shape == (0, 4, DIM)
    loss = sum(o.sum() for o in out)
    if loss.requires_grad:  # the backward runs too, giving zero gradients
        loss.backward()
        assert all(p.grad is not None and not p.grad.any() for p in pe.parameters() if p.requires_grad)
