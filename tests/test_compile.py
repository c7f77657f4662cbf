"""torch.compile on the rotary paths: no graph breaks in ``pe(coords)`` + ``rot.apply(q)``, same numbers as eager."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from liere import LieRE, PositionEncoding, RoPE, RoPEMixed, grid_coords

HEADS, GRID = 2, (3, 4)


def encodings() -> dict[str, tuple[PositionEncoding, torch.Tensor]]:
    """Encodings with the coordinates they are used with; paper-init LieRE so that the exponential squares."""
    unit_grid = grid_coords(*GRID, spacing=[1 / (n - 1) for n in GRID])
    return {
        "rope": (RoPE(16), grid_coords(12)),
        "rope-mixed": (RoPEMixed(16, 2, num_heads=HEADS, seed=0), grid_coords(*GRID)),
        "liere8": (LieRE(16, 2, num_heads=HEADS, block_size=8, init="uniform", seed=0), unit_grid),
        "liere64": (LieRE(64, 2, num_heads=HEADS, block_size=64, init="uniform", seed=0), unit_grid),
        # eager takes the 1D progression path (powers of one exponential), compiled the general one
        "liere64-1d": (LieRE(64, 1, num_heads=HEADS, block_size=64, seed=0), grid_coords(12)),
    }


def rotate(pe: PositionEncoding) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(coords: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return pe(coords).apply(q)

    return fn


def queries(pe: PositionEncoding, coords: torch.Tensor) -> torch.Tensor:
    return torch.randn(2, HEADS, coords.shape[0], pe.head_dim, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(encodings()))
def test_no_graph_breaks(name: str) -> None:
    pe, coords = encodings()[name]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(rotate(pe))(coords, queries(pe, coords))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(encodings()))
def test_compiled_matches_eager_forward_and_backward(name: str) -> None:
    """In float64, so that the compiled general exponential and eager's path (e.g. powers of one exponential for
    1D progressions) agree far below the tolerance instead of differing by fp32 rounding of different algorithms."""
    pe, coords = encodings()[name]
    pe, coords = pe.double(), coords.double()
    torch._dynamo.reset()
    compiled = torch.compile(rotate(pe), backend="aot_eager", fullgraph=True)
    outputs, grads = [], []
    for fn in (rotate(pe), compiled):
        pe.zero_grad()
        q = queries(pe, coords).double().requires_grad_()
        out = fn(coords, q)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([q.grad] + [p.grad.clone() for p in pe.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-9, rtol=1e-9)
    for compiled_grad, eager_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-8, rtol=1e-8)


@pytest.mark.slow
def test_inductor_liere8() -> None:
    """One real (inductor) compile; skipped where no C++ toolchain works or it is too slow for CI."""
    pe, coords = encodings()["liere8"]
    q = queries(pe, coords)
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        out = torch.compile(rotate(pe), fullgraph=True)(coords, q)
    except Exception as err:  # any toolchain failure means inductor is unusable here
        pytest.skip(f"inductor unavailable on this machine: {type(err).__name__}: {err}"[:200])
    if time.perf_counter() - start > 60:
        pytest.skip("inductor compile took more than 60 s on this machine")
    torch.testing.assert_close(out, rotate(pe)(coords, q), atol=1e-5, rtol=1e-5)
