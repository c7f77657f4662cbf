"""What learned rotary generators look like: commutators and rotation frequencies of ``skew_generators()``.

For encodings with ``R(p) = exp(sum_a p_a A_a)`` (LieRE, RoPE-Mixed, STRING, ComRoPE). ``train`` logs
``position_metrics`` during training; ``train.ab.inspect`` draws and tabulates the rest.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


def generators(model: nn.Module) -> Tensor | None:
    """The ``model.encoding``'s skew generators ``(depth, heads, axes, d, d)`` in fp64 on the CPU, or None if it
    has none."""
    encoding = getattr(model, "encoding", None)
    if encoding is None or not hasattr(encoding, "skew_generators"):
        return None
    with torch.no_grad():
        return encoding.skew_generators().detach().double().cpu()


def axis_pairs(num_axes: int) -> list[tuple[int, int]]:
    """All axis pairs ``(a, b)``, ``a < b``."""
    return list(itertools.combinations(range(num_axes), 2))


def commutator_sizes(gens: Tensor) -> Tensor:
    """``|[A_a, A_b]|_F / (|A_a|_F |A_b|_F)`` per layer, head and axis pair: ``(depth, heads, pairs)``.

    Scale-free (it does not depend on the coordinate unit); 0 for commuting generators, at most ``sqrt(2)``.
    """
    if gens.dim() != 5 or gens.shape[-1] != gens.shape[-2]:
        raise ValueError(f"gens must be (depth, heads, axes, d, d), got shape {tuple(gens.shape)}")
    norms = torch.linalg.matrix_norm(gens)  # (depth, heads, axes)
    sizes = []
    for a, b in axis_pairs(gens.shape[2]):
        A, B = gens[:, :, a], gens[:, :, b]
        comm = torch.linalg.matrix_norm(A @ B - B @ A)
        sizes.append(comm / (norms[:, :, a] * norms[:, :, b]).clamp_min(torch.finfo(gens.dtype).tiny))
    return torch.stack(sizes, -1) if sizes else gens.new_zeros(*gens.shape[:2], 0)


def frequencies(gens: Tensor) -> Tensor:
    """Rotation frequencies ``w`` per layer, head and axis, descending: ``(depth, heads, axes, d // 2)``.

    A real skew matrix has eigenvalues ``± i w`` (and 0 for odd sizes); each pair is counted once.
    """
    w = torch.linalg.eigvals(gens).imag.abs().sort(dim=-1, descending=True).values
    return w[..., : 2 * (gens.shape[-1] // 2) : 2]


def position_metrics(model: nn.Module) -> dict[str, float]:
    """Commutator sizes to log during training: mean and max over layers, heads and axis pairs, and each layer's
    mean (``commutator_l<i>``). Empty for encodings without generators or with one axis."""
    gens = generators(model)
    if gens is None or gens.shape[2] < 2:
        return {}
    sizes = commutator_sizes(gens)
    per_layer = {f"commutator_l{i}": float(v) for i, v in enumerate(sizes.mean((1, 2)))}
    return {"commutator_mean": float(sizes.mean()), "commutator_max": float(sizes.max()), **per_layer}
