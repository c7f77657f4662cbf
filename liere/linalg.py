"""Small dense linear-algebra helpers shared by the encodings: skew-symmetric parameterisation and
block-diagonal assembly."""

from __future__ import annotations

import torch
from torch import Tensor


def num_skew_params(b: int) -> int:
    """Free parameters of a ``b x b`` skew-symmetric matrix: ``b (b - 1) / 2``."""
    return b * (b - 1) // 2


def skew_from_params(params: Tensor, b: int) -> Tensor:
    """Assemble skew-symmetric matrices from their strictly-lower-triangle entries.

    ``params`` has shape ``(..., b (b-1) / 2)``, ordered like ``torch.tril_indices(b, b, -1)``; the result
    ``A`` has shape ``(..., b, b)`` with ``A[i, j] = p`` and ``A[j, i] = -p`` for ``i > j``. For ``b = 2``
    the single parameter is the rotation angle: ``exp(A) = [[cos p, -sin p], [sin p, cos p]]``.
    """
    if params.shape[-1] != num_skew_params(b):
        raise ValueError(f"params: last dim must be b(b-1)/2 = {num_skew_params(b)} for b={b}, got {params.shape[-1]}")
    rows, cols = torch.tril_indices(b, b, -1, device=params.device)
    lower = params.new_zeros(*params.shape[:-1], b, b)
    lower[..., rows, cols] = params
    return lower - lower.transpose(-1, -2)


def pair_block_params(freqs: Tensor, b: int) -> Tensor:
    """Strictly-lower-triangle parameters ``(..., b (b-1) / 2)`` of ``b x b`` skew blocks holding the 2x2
    generators ``[[0, -w], [w, 0]]`` of ``freqs`` ``(..., b // 2)`` on the feature pairs ``(2k, 2k+1)``."""
    rows, cols = torch.tril_indices(b, b, -1)
    pair_entries = ((rows % 2 == 1) & (cols == rows - 1)).nonzero().squeeze(-1)
    params = freqs.new_zeros(*freqs.shape[:-1], num_skew_params(b))
    params[..., pair_entries] = freqs
    return params


def block_diag(blocks: Tensor, size: int, fill_identity: bool) -> Tensor:
    """Dense ``(..., size, size)`` matrices with ``blocks`` ``(..., nb, b, b)`` on the diagonal.

    The blocks cover features ``[0, nb * b)``; the remaining ``size - nb * b`` features get the identity
    (``fill_identity=True``, for rotations) or zeros (for generators).
    """
    nb, b = blocks.shape[-3], blocks.shape[-1]
    rot_dim = nb * b
    if rot_dim > size:
        raise ValueError(f"blocks cover {rot_dim} features, more than size={size}")
    idx = torch.arange(nb, device=blocks.device)
    inner = blocks.new_zeros(*blocks.shape[:-3], nb, b, nb, b)
    inner[..., idx, :, idx, :] = blocks.movedim(-3, 0)
    inner = inner.reshape(*blocks.shape[:-3], rot_dim, rot_dim)
    if rot_dim == size:
        return inner
    out = blocks.new_zeros(*blocks.shape[:-3], size, size)
    out[..., :rot_dim, :rot_dim] = inner
    if fill_identity:
        out[..., rot_dim:, rot_dim:] = torch.eye(size - rot_dim, dtype=blocks.dtype, device=blocks.device)
    return out


def solve_unpivoted(A: Tensor, B: Tensor) -> Tensor:
    """``X = A^-1 B`` for ``A`` ``(..., n, n)``, ``B`` ``(..., n, k)`` by Gauss-Jordan elimination without pivoting,
    in plain tensor ops (``n`` unrolled steps): exportable where ``torch.linalg.solve`` is not (ONNX has no solve).
    Stable for ``A`` whose symmetric part is positive definite, such as ``I + S`` with skew ``S``."""
    n = A.shape[-1]
    M = torch.cat([A, B], dim=-1)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    for k in range(n):
        pivot_row = M[..., k : k + 1, :] / M[..., k : k + 1, k : k + 1]
        M = M - (M[..., :, k : k + 1] - eye[:, k : k + 1]) * pivot_row  # row k becomes pivot_row, others lose col k
    return M[..., n:]
