"""Rotation blocks ``exp(sum_a p_a G_a)`` of learned block-diagonal skew generators (LieRE, ComRoPE), computed
the cheapest exact way: powers of one exponential on evenly spaced 1D positions, and optionally recomputed in
the backward, chunk by chunk, instead of keeping the exponential's intermediates."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from liere.coords import Progression, in_func_transform
from liere.expm import skew_expm, skew_expm_progression

RECOMPUTE_FROM_BLOCK_SIZE = 16  # recompute=None: recompute from this block size up
# Matrix entries exponentiated at once by the chunked path: ~20 intermediates (and their gradients in the
# backward) of this many fp32 entries are alive at a time, ~100 MiB at 2^19 (BENCHMARKS.md, peak memory).
CHUNK_ELEMENTS = 2**19


def resolve_recompute(recompute: bool | None, block_size: int) -> bool:
    """``recompute``, or for None: True from ``RECOMPUTE_FROM_BLOCK_SIZE`` up (the exponential's ~20
    intermediates per matrix grow with the block size; BENCHMARKS.md measures the memory)."""
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool or None, got {recompute!r}")
    return block_size >= RECOMPUTE_FROM_BLOCK_SIZE if recompute is None else recompute


def generator_exponentials(
    coords: Tensor,
    gens: Tensor,
    method: str = "auto",
    recompute: bool = False,
    progression: Progression | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Blocks of ``exp(sum_a p_a G_a)``: coords ``(S, n, axes)``, generator blocks ``gens``
    ``(depth, heads, axes, nb, b, b)`` -> ``(depth, S, heads, n, nb, b, b)``.

    For 1D coordinates known to be ``start + i * step`` (``progression``: a 1D ``Grid``, or a tensor found evenly
    spaced by validation) the blocks are powers of one exponential per generator (``skew_expm_progression``, ~20x
    fewer matmuls). With ``recompute`` (and gradients needed) the computation reruns in the backward, so only
    ``coords`` and ``gens`` are kept for it, not ~20 intermediates per matrix (~1 for powers). Eager
    one-exponential-per-position rotations with ``recompute``, or without gradients, are computed (and
    recomputed) in chunks of at most ``chunk`` matrix entries (default ``CHUNK_ELEMENTS``), so the exponential's
    transient memory stays bounded whatever the number of layers, heads and positions; compiled models
    checkpoint the whole stack instead.
    """
    grad = torch.is_grad_enabled() and (gens.requires_grad or coords.requires_grad)
    if in_func_transform():  # torch.func: plain autograd (no custom Function, no checkpoint's saved-tensor hooks)
        recompute = False
    if progression is not None and gens.shape[2] == 1:
        compute, args = partial(_powers, progression=progression, n=coords.shape[1], method=method), (gens,)
    elif (recompute or not grad) and not torch.compiler.is_compiling() and not in_func_transform():
        return _ChunkedExponentials.apply(coords, gens, method, chunk or CHUNK_ELEMENTS)
    else:
        compute, args = partial(_direct, method=method), (coords, gens)
    if recompute and grad:
        return checkpoint(compute, *args, use_reentrant=False)
    return compute(*args)


def _direct(coords: Tensor, gens: Tensor, method: str) -> Tensor:
    """One exponential per position: ``skew_expm`` of ``sum_a p_a G_a``."""
    return skew_expm(torch.einsum("sna,lhaiuv->lshniuv", coords, gens), method=method)


def _powers(gens: Tensor, progression: tuple[float, float], n: int, method: str) -> Tensor:
    """1D coords ``start + i * step``, ``i < n``: one exponential per generator, then its powers."""
    powers = skew_expm_progression(gens[:, :, 0], *progression, n, method)  # (depth, heads, nb, n, b, b)
    return powers.movedim(-3, -4).unsqueeze(1).contiguous()


def _chunks(coords: Tensor, gens: Tensor, chunk: int) -> list[tuple[int, int, slice]]:
    """``(layer, sample, positions)`` pieces of the output, each at most ``chunk`` matrix entries (>= 1 position)."""
    depth, heads, _, nb, b, _ = gens.shape
    samples, n, _ = coords.shape
    step = max(1, chunk // (heads * nb * b * b))
    return [(l, s, slice(i, min(i + step, n))) for l in range(depth) for s in range(samples) for i in range(0, n, step)]


def _piece(coords: Tensor, gens: Tensor, method: str) -> Tensor:
    """``exp(sum_a p_a G_a)`` for one layer and sample: coords ``(n, axes)``, gens ``(heads, axes, nb, b, b)``
    -> ``(heads, n, nb, b, b)``."""
    return skew_expm(torch.einsum("na,haiuv->hniuv", coords, gens), method=method)


class _ChunkedExponentials(torch.autograd.Function):
    """``_direct`` computed chunk by chunk into one output; the backward recomputes each chunk and takes its
    gradient before the next, so one chunk's intermediates (and their gradients) are alive at a time. Saves only
    ``coords`` and ``gens``. Under ``create_graph=True`` the backward recomputes everything at once with a graph
    (second-order gradients)."""

    @staticmethod
    def forward(ctx: Any, coords: Tensor, gens: Tensor, method: str, chunk: int) -> Tensor:
        ctx.save_for_backward(coords, gens)
        ctx.save_for_forward(coords, gens)
        ctx.method, ctx.chunk = method, chunk
        depth, heads, _, nb, b, _ = gens.shape
        out = gens.new_empty(depth, coords.shape[0], heads, coords.shape[1], nb, b, b)
        for layer, sample, positions in _chunks(coords, gens, chunk):
            out[layer, sample, :, positions] = _piece(coords[sample, positions], gens[layer], method)
        return out

    @staticmethod
    def jvp(ctx: Any, coords_tangent: Tensor | None, gens_tangent: Tensor | None, *_: None) -> Tensor:
        """Forward-mode AD of ``_direct`` at once, by reverse over reverse (forward AD cannot nest): the vector-Jacobian
        product is linear in its vector ``u``, so its gradient w.r.t. ``u`` along the tangents is the JVP."""
        saved = ctx.saved_tensors
        tangents = [
            torch.zeros_like(t) if d is None else d for t, d in zip(saved, (coords_tangent, gens_tangent), strict=True)
        ]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in saved]
            out = _direct(*inputs, ctx.method)
            u = torch.zeros_like(out, requires_grad=True)
            vjp = torch.autograd.grad(out, inputs, u, create_graph=True)
            return torch.autograd.grad(vjp, u, tangents)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        coords, gens = ctx.saved_tensors
        need_coords, need_gens = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward through one whole recompute
            with torch.enable_grad():
                inputs = [t for t, need in ((coords, need_coords), (gens, need_gens)) if need]
                grads = iter(torch.autograd.grad(_direct(coords, gens, ctx.method), inputs, grad, create_graph=True))
            return (next(grads) if need_coords else None), (next(grads) if need_gens else None), None, None
        grad_coords = torch.zeros_like(coords) if need_coords else None
        grad_gens = torch.zeros_like(gens) if need_gens else None
        for layer, sample, positions in _chunks(coords, gens, ctx.chunk):
            with torch.enable_grad():
                c = coords[sample, positions].detach().requires_grad_(need_coords)
                g = gens[layer].detach().requires_grad_(need_gens)
                out = _piece(c, g, ctx.method)
                inputs = [t for t in (c, g) if t.requires_grad]
                grads = iter(torch.autograd.grad(out, inputs, grad[layer, sample, :, positions]))
            if need_coords:
                grad_coords[sample, positions] += next(grads)
            if need_gens:
                grad_gens[layer] += next(grads)
        return grad_coords, grad_gens, None, None
