"""LieRE's fast paths give the general path's numbers: 1D powers of one exponential, recompute in the backward."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import scipy.linalg
import torch

import liere.block_exp
from bench.step import saved_mib
from liere import ComRoPE, Grid, LieRE, Rotations, grid_coords, rotary_attention
from liere.coords import check_coords, inspect_coords
from liere.expm import orthogonality_error, skew_expm_progression


def generators(b: int, heads: int = 2) -> torch.Tensor:
    """1D rope-init LieRE generators ``(heads, 64 / b, b, b)``: RoPE frequencies 1 .. 1e-4 in every block."""
    return LieRE(64, 1, num_heads=heads, block_size=b, seed=0).generator_blocks()[0, :, 0].detach()


@pytest.mark.parametrize("b", [4, 8, 64])
@pytest.mark.parametrize(("n", "start", "step"), [(1, 2.0, 1.0), (16, 0.0, 1.0), (300, 0.0, 1.0), (77, -3.0, 0.5)])
def test_progression_matches_scipy_and_stays_orthogonal(b: int, n: int, start: float, step: float) -> None:
    A = generators(b)
    R = skew_expm_progression(A, start, step, n)
    assert R.shape == (*A.shape[:-2], n, b, b)
    A64 = A.double().numpy()
    for i in sorted({0, n // 2, n - 1}):
        p = start + i * step
        ref = np.stack([[scipy.linalg.expm(p * a) for a in head] for head in A64])
        # fp32 error grows like |p| |A| eps on every route (this one: E's rounding to the p-th power)
        assert np.abs(R[..., i, :, :].double().numpy() - ref).max() <= 2e-7 * max(1.0, abs(p)), (i, p)
    assert orthogonality_error(R) <= 5e-6


def test_progression_gradient_matches_fp64_gradcheck() -> None:
    A = generators(4, heads=1).double()[:, :1].requires_grad_()

    def fn(A: torch.Tensor) -> torch.Tensor:
        return skew_expm_progression(A - A.mT, 0.5, 0.75, 5)  # any direction stays skew

    assert torch.autograd.gradcheck(fn, (A,))


@pytest.mark.parametrize(
    ("n", "start", "step", "error"),
    [(0, 0.0, 1.0, "n must be"), (True, 0.0, 1.0, "n must be"), (4, 0.0, float("nan"), "finite")],
)
def test_progression_bad_arguments(n: object, start: float, step: float, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        skew_expm_progression(generators(8), start, step, n)  # type: ignore[arg-type]


def test_arithmetic_progression_detection() -> None:
    def detect(coords: torch.Tensor) -> tuple[float, float] | None:
        return inspect_coords(check_coords(coords, coords.shape[-1]), detect_progression=True)

    assert detect(grid_coords(10)) == (0.0, 1.0)
    start, step = detect(grid_coords(1000, spacing=1 / 999))
    assert start == 0 and step == pytest.approx(1 / 999)
    assert detect(grid_coords(5) * 2 + 3) == (3.0, 2.0)
    assert detect(torch.tensor([[0.0], [1.0], [3.0]])) is None  # not evenly spaced
    assert detect(grid_coords(1)) is None  # a single position: nothing to gain
    assert detect(grid_coords(4).expand(2, 4, 1)) is None  # per-sample coordinates
    assert detect(grid_coords(2, 3)) is None  # 2D
    coords = grid_coords(6)
    assert detect(coords) == (0.0, 1.0)
    coords.numpy()[2] = 7.0  # in place behind autograd's back (no version bump): still seen, nothing is cached
    assert detect(coords) is None


def rotate_and_grads(pe: LieRE | ComRoPE, coords: torch.Tensor | Grid) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rotated queries of every layer, and the gradients of a random loss for the queries and generators."""
    gen = torch.Generator().manual_seed(1)
    n = coords.num_positions if isinstance(coords, Grid) else coords.shape[0]
    q = torch.randn(3, pe.num_heads, n + 1, pe.head_dim, generator=gen, requires_grad=True)
    rot = pe(coords, num_prefix_tokens=1)
    out = torch.stack([rot.for_layer(i).apply(q) for i in range(pe.depth)])
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    grads = [q.grad, *(p.grad for p in pe.parameters())]
    pe.zero_grad()
    return out.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("b", [3, 8, 64])
@pytest.mark.parametrize("spacing", [1.0, 1 / 99])
def test_liere_1d_progression_path_equals_general_path(b: int, spacing: float, monkeypatch: pytest.MonkeyPatch) -> None:
    init = "uniform" if spacing < 1 else "rope"  # the paper's init is meant for coordinates in [0, 1]
    pe = LieRE(64, 1, num_heads=2, depth=2, block_size=b, rot_dim=64 // b * b, init=init, seed=0)
    assert_same_numbers(pe, Grid((100,), spacing), monkeypatch)


def assert_same_numbers(pe: LieRE | ComRoPE, grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotated queries and gradients agree between the powers path (a 1D ``Grid``, or its coordinates tensor found
    evenly spaced) and the general path; the ``Grid`` and the tensor give identical numbers."""
    fast, fast_grads = rotate_and_grads(pe, grid)
    detected, detected_grads = rotate_and_grads(pe, grid.coords())
    torch.testing.assert_close(detected, fast, atol=0, rtol=0)
    for g_detected, g_fast in zip(detected_grads, fast_grads, strict=True):
        torch.testing.assert_close(g_detected, g_fast, atol=0, rtol=0)
    monkeypatch.setattr(pe, "uses_progression", False)  # the general path: one exponential per position
    slow, slow_grads = rotate_and_grads(pe, grid)
    torch.testing.assert_close(fast, slow, atol=2e-4, rtol=0)
    for g_fast, g_slow in zip(fast_grads, slow_grads, strict=True):
        assert (g_fast.flatten(1).abs().sum(-1) > 0).all()  # every layer's (and sample's) gradient arrives
        torch.testing.assert_close(g_fast, g_slow, atol=2e-3 * g_slow.abs().max().item(), rtol=0)


@pytest.mark.parametrize("variant", ["ap", "ld"])
def test_comrope_1d_progression_path_equals_general_path(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pe = ComRoPE(64, 1, num_heads=2, depth=2, variant=variant, block_size=16, seed=0)
    assert pe.recompute  # b=16: recompute on by default
    assert_same_numbers(pe, Grid((100,)), monkeypatch)


def test_recompute_gives_identical_numbers_and_saves_memory() -> None:
    coords = grid_coords(7, 7)
    results, saved = {}, {}
    for recompute in (False, True):
        pe = LieRE(64, 2, num_heads=2, depth=3, block_size=16, seed=0, recompute=recompute)
        results[recompute] = rotate_and_grads(pe, coords)
        q = torch.randn(2, 2, 50, 64)
        saved[recompute] = saved_mib(lambda q, pe=pe: pe(coords, num_prefix_tokens=1)[0].apply(q), q, nullcontext())
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    for g_recompute, g_kept in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(g_recompute, g_kept, atol=0, rtol=0)
    assert saved[True] < saved[False] / 4, saved


def test_recompute_default_and_bad_value() -> None:
    assert LieRE(64, 2, block_size=8).recompute is False
    assert LieRE(64, 2, block_size=16).recompute is True
    assert LieRE(64, 2, block_size=64, recompute=False).recompute is False
    with pytest.raises(TypeError, match="recompute must be a bool or None"):
        LieRE(64, 2, recompute="yes")  # type: ignore[arg-type]


def test_rotary_attention_under_autocast_matches_fp32() -> None:
    """Under autocast the block matrices are cast once for q and k; the result is fp32's up to bf16 rounding."""
    pe = LieRE(16, 2, num_heads=2, block_size=8, seed=0)
    rot = pe(grid_coords(3, 3))
    q, k, v = torch.randn(3, 2, 2, 9, 16, generator=torch.Generator().manual_seed(0))
    reference = rotary_attention(q, k, v, rot)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rotary_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), rot)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=5e-2, rtol=0)


@pytest.mark.parametrize(("samples", "heads"), [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_block_application_gradients(samples: int, heads: int) -> None:
    """The block application's own backward (it saves x, not einsum's copy) against fp64 gradcheck."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(1, samples, heads, 4, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(3, 2, 4, 7, dtype=torch.float64, generator=gen, requires_grad=True)  # one feature passes
    assert torch.autograd.gradcheck(lambda blocks, x: Rotations(7, blocks=blocks).apply(x), (blocks, x))


def test_progression_low_precision_input_is_computed_in_fp32() -> None:
    A = generators(64)
    reference = skew_expm_progression(A.bfloat16().float(), 0.0, 1.0, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        R = skew_expm_progression(A.bfloat16(), 0.0, 1.0, 256)
    assert R.dtype == torch.bfloat16
    assert (R.float() - reference).abs().max() <= 4e-3  # the output rounding, no drift along the products


@pytest.mark.parametrize(("b", "samples"), [(8, 1), (64, 2)])
@pytest.mark.parametrize("chunk", [1, 3 * 64 * 64 * 5])
def test_chunked_exponentials_match_unchunked(b: int, samples: int, chunk: int) -> None:
    """Chunk-wise (re)computation gives the one-stack exponential's rotations and gradients (coords and generators)
    to fp32 rounding, for one matrix per chunk and for chunks that split a layer's positions unevenly."""
    gen = torch.Generator().manual_seed(0)
    gens = LieRE(64, 2, num_heads=3, depth=2, block_size=b, init="uniform", seed=0).generator_blocks().detach()
    coords = torch.rand(samples, 13, 2, generator=gen)
    cotangent = torch.randn(2, samples, 3, 13, 64 // b, b, b, generator=gen)
    results = []
    for recompute in (False, True):
        c, g = coords.clone().requires_grad_(), gens.clone().requires_grad_()
        out = liere.block_exp.generator_exponentials(c, g, recompute=recompute, chunk=chunk)
        results.append((out.detach(), *torch.autograd.grad(out, (c, g), cotangent)))
        with torch.no_grad():  # inference takes the chunked forward too
            inference = liere.block_exp.generator_exponentials(c, g, chunk=chunk)
        torch.testing.assert_close(inference, out.detach(), atol=1e-5, rtol=0)
    for chunked, whole in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(chunked, whole, atol=1e-5 * whole.abs().max().item(), rtol=0)
