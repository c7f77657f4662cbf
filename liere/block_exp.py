"""Rotation blocks ``exp(sum_a p_a G_a)`` of learned block-diagonal skew generators (LieRE, ComRoPE), computed
the cheapest exact way: powers of one exponential on evenly spaced 1D positions, and optionally recomputed in
the backward instead of keeping the exponential's intermediates."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from liere.coords import Progression
from liere.expm import skew_expm, skew_expm_progression

RECOMPUTE_FROM_BLOCK_SIZE = 16  # recompute=None: recompute from this block size up


def resolve_recompute(recompute: bool | None, block_size: int) -> bool:
    """``recompute``, or for None: True from ``RECOMPUTE_FROM_BLOCK_SIZE`` up (the exponential's ~20
    intermediates per matrix grow with the block size: +27% of a ViT-S step's saved activations at b=64, +3% at
    b=8; BENCHMARKS.md)."""
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool or None, got {recompute!r}")
    return block_size >= RECOMPUTE_FROM_BLOCK_SIZE if recompute is None else recompute


def generator_exponentials(
    coords: Tensor, gens: Tensor, method: str = "auto", recompute: bool = False, progression: Progression | None = None
) -> Tensor:
    """Blocks of ``exp(sum_a p_a G_a)``: coords ``(S, n, axes)``, generator blocks ``gens``
    ``(depth, heads, axes, nb, b, b)`` -> ``(depth, S, heads, n, nb, b, b)``.

    For 1D coordinates known to be ``start + i * step`` (``progression``: a 1D ``Grid``, or a tensor found evenly
    spaced by validation) the blocks are powers of one exponential per generator (``skew_expm_progression``, ~20x
    fewer matmuls). With ``recompute`` (and
    gradients needed) the computation reruns in the backward (``torch.utils.checkpoint``), so only ``coords`` and
    ``gens`` are kept for it, not ~20 intermediates per matrix (~1 for powers).
    """
    if progression is None or gens.shape[2] != 1:
        compute, args = partial(_direct, method=method), (coords, gens)
    else:
        compute, args = partial(_powers, progression=progression, n=coords.shape[1], method=method), (gens,)
    if recompute and torch.is_grad_enabled() and gens.requires_grad:
        return checkpoint(compute, *args, use_reentrant=False)
    return compute(*args)


def _direct(coords: Tensor, gens: Tensor, method: str) -> Tensor:
    """One exponential per position: ``skew_expm`` of ``sum_a p_a G_a``."""
    return skew_expm(torch.einsum("sna,lhaiuv->lshniuv", coords, gens), method=method)


def _powers(gens: Tensor, progression: tuple[float, float], n: int, method: str) -> Tensor:
    """1D coords ``start + i * step``, ``i < n``: one exponential per generator, then its powers."""
    powers = skew_expm_progression(gens[:, :, 0], *progression, n, method)  # (depth, heads, nb, n, b, b)
    return powers.movedim(-3, -4).unsqueeze(1).contiguous()
