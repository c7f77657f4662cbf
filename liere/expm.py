"""Matrix exponential of stacks of skew-symmetric matrices: ``R = exp(A)`` is a rotation.

``skew_expm(A, method)`` takes ``A`` of shape ``(..., b, b)`` with ``A^T = -A`` and returns ``exp(A)`` with
the same shape and dtype. The input must be skew-symmetric; this is not checked (an exact check costs a
full pass), and for a non-skew input the methods disagree and none returns a rotation.

Methods (all differentiable with plain autograd; fp16/bf16 are computed in fp32 with autocast off, fp64 in
fp64):

- ``"exact"``: ``torch.linalg.matrix_exp`` (degree-18 Taylor, scaling and squaring). In fp32 it drifts
  off the orthogonal group at large norms (~1e-4 at norm 1e3); in bf16 natively it returns NaN.
- ``"closed"``: closed forms, ``b = 2`` (cos/sin of the angle ``A[..., 1, 0]``), ``b = 3`` (Rodrigues) and
  ``b = 4`` (two commuting isoclinic rotations, one product).
- ``"taylor_cans"``: per-matrix scaling ``A / 2^s`` with ``s`` from a spectral-norm bound (taken on ``A``
  prescaled by a power of two, so it cannot overflow at any finite norm), degree-12 Taylor polynomial
  (Paterson-Stockmeyer), ``s`` squarings, and CANS polishing steps (Chebyshev-accelerated Newton-Schulz,
  arXiv 2506.10935) after every ``_POLISH_EVERY`` squarings and at the end, which pull the result back onto
  the orthogonal group, so it stays orthogonal to working precision at any norm. The backward goes straight
  through the polish. Products per matrix: 5, plus ``s``, plus 2 per polish step (backward: 2 per
  non-polish product). Eagerly it reads ``min s, max s`` and a finiteness flag back to the host in one
  device sync; under ``torch.compile`` it reads nothing back (no graph break) and does 8 masked squarings
  (``torch.cond`` on the largest ``s``) or, when a matrix needs more, ``COMPILED_SQUARINGS`` (also under
  ``torch.export``), enough for spectral norms up to
  ``~1.6 * 2^COMPILED_SQUARINGS`` (about 1e5); beyond that (or for non-finite input) the compiled call
  raises ``RuntimeError`` asynchronously: raise ``liere.expm.COMPILED_SQUARINGS`` before compiling.
- ``"auto"``: ``"closed"`` for ``b <= 4``, else ``"taylor_cans"``.

Eager calls raise ``ValueError`` on non-finite ``A`` (``taylor_cans`` folds that check into its one sync,
the other methods spend a sync on it); compiled calls skip the check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from liere.coords import in_func_transform

METHODS = ("auto", "exact", "closed", "taylor_cans")

# Taylor degree per working dtype. For skew (normal) X with spectral norm r the truncation error is
# ~ r^(m+1) / (m+1)!, so X is scaled until r <= theta with r^(m+1) / (m+1)! = unit roundoff. (Bader-Blanes-Casas
# evaluation schemes, as in torch.linalg.matrix_exp, need fewer products per degree but cancel large coefficients,
# which costs ~10x in fp32 relative error after the squarings.)
_DEGREE = {torch.float32: 12, torch.float64: 20}
COMPILED_SQUARINGS = 16
_POLISH_EVERY = 8  # squarings between CANS steps: 2^8 unit stays far below the step's reach
_SHORT_CHAIN = 8  # compiled: masked squarings when no matrix needs more (a torch.cond picks this or COMPILED_SQUARINGS)


def skew_expm(A: Tensor, method: str = "auto") -> Tensor:
    """``exp(A)`` for skew-symmetric ``A`` of shape ``(..., b, b)``, ``b >= 2``; same shape and dtype."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not A.is_floating_point():
        raise TypeError(f"A must be a floating-point tensor, got dtype {A.dtype}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] < 2:
        raise ValueError(f"A must have shape (..., b, b) with b >= 2, got {tuple(A.shape)}")
    b = A.shape[-1]
    if method == "auto":
        method = "closed" if b <= 4 else "taylor_cans"
    if method == "closed" and b > 4:
        raise ValueError(f"method='closed' needs b = 2, 3 or 4, got b = {b}")
    if method != "taylor_cans" and not reads_nothing() and not bool(torch.isfinite(A).all()):
        raise ValueError("A has non-finite entries")
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=A.device.type, enabled=False):
        X = A.to(work)
        if X.numel() == 0:
            R = X.clone()
        elif method == "exact":
            R = torch.linalg.matrix_exp(X.contiguous())  # its batched path views the input
        elif method == "closed":
            R = (_rot2, _rodrigues, _isoclinic)[b - 2](X)
        else:
            R = _taylor_cans(X)
    return R.to(A.dtype)


def skew_expm_progression(A: Tensor, start: float, step: float, n: int, method: str = "auto") -> Tensor:
    """``exp((start + i * step) A)`` for ``i = 0 .. n-1``: skew ``A`` ``(..., b, b)`` -> ``(..., n, b, b)``.

    For evenly spaced 1D positions (token indices) one exponential per generator replaces ``n``:
    ``R_i = exp(start A) E^i`` with ``E = exp(step A)``, the powers built by doubling
    (``R_{i + 2^k} = R_i E^(2^k)``): ``n - 1`` matmuls and ``log2 n`` squarings in ``ceil(log2 n)`` batched
    steps, against ~20 matmuls per position for ``skew_expm`` of every ``p_i A``; autograd keeps ~2 matrices
    per position instead of ~20. Accuracy matches the direct route: both errors grow like
    ``|p| |A| eps`` (here from ``E``'s rounding raised to the ``i``-th power, there from rounding ``p_i A``).
    Each ``E^(2^k)`` gets one CANS polishing step (squaring doubles the distance to the orthogonal group),
    so the products stay orthogonal to ``~log2(n) eps``. Like ``skew_expm``, fp16/bf16 input is computed in
    fp32 (autocast off) and cast back.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (math.isfinite(start) and math.isfinite(step)):
        raise ValueError(f"start and step must be finite, got {start} and {step}")
    work = torch.float64 if A.dtype == torch.float64 else torch.float32  # products of bf16 rotations drift
    with torch.autocast(device_type=A.device.type, enabled=False):
        X = A.to(work)
        eye = torch.eye(X.shape[-1], dtype=work, device=X.device)
        powers = (skew_expm(start * X, method) if start else eye.expand(X.shape)).unsqueeze(-3)  # R_0
        square = skew_expm(step * X, method)  # E^(2^k), k = 0 first
        while powers.shape[-3] < n:
            count = powers.shape[-3]
            new = powers[..., : n - count, :, :]  # R_i E^count for i < min(count, n - count)
            new = (new.flatten(-3, -2) @ square).unflatten(-2, new.shape[-3:-1])
            powers = torch.cat([powers, new], dim=-3)
            if powers.shape[-3] < n:  # squaring doubles the distance to the group: pull it back each time
                square = _cans_step(square @ square, eye)
    return powers.to(A.dtype)


def orthogonality_error(R: Tensor) -> Tensor:
    """``max |R^T R - I|`` over a stack ``(..., b, b)``, computed in fp64 (0-dim tensor)."""
    R = R.detach().to(torch.float64)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return (R.mT @ R - eye).abs().amax()


def _rot2(X: Tensor) -> Tensor:
    t = X[..., 1, 0]
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)


def _rodrigues(X: Tensor) -> Tensor:
    """``I + sin(t)/t X + (1 - cos t)/t^2 X^2`` with ``t^2 = |X|_F^2 / 2``; Taylor series for small ``t``."""
    t2 = (X * X).sum((-2, -1)) / 2
    _, sinc = _cos_sinc(t2)
    half = _cos_sinc(t2 / 4)[1] ** 2 / 2  # (1 - cos t) / t^2 = sinc(t/2)^2 / 2
    eye = torch.eye(3, dtype=X.dtype, device=X.device)
    return eye + sinc[..., None, None] * X + half[..., None, None] * (X @ X)


def _isoclinic(X: Tensor) -> Tensor:
    """``exp`` on so(4): ``X = X+ + X-`` with ``X+-`` its (anti-)self-dual parts, ``(X+-)^2 = -a+-^2 I``.

    ``X+`` and ``X-`` commute, so ``exp(X) = exp(X+) exp(X-)``, and each factor is an isoclinic rotation
    ``cos(a) I + sin(a)/a X+-`` with ``a^2 = |X+-|_F^2 / 4``.
    """
    dual = X.flatten(-2)[..., _HODGE_INDEX.to(X.device)].unflatten(-1, (4, 4))
    parts = [(X + dual) / 2, (X - dual) / 2]
    (c1, s1), (c2, s2) = (_cos_sinc((p * p).sum((-2, -1)) / 4) for p in parts)
    (c1, s1, c2, s2) = (v[..., None, None] for v in (c1, s1, c2, s2))
    eye = torch.eye(4, dtype=X.dtype, device=X.device)
    return c1 * c2 * eye + (c2 * s1) * parts[0] + (c1 * s2) * parts[1] + (s1 * s2) * (parts[0] @ parts[1])


def _hodge_index() -> Tensor:
    """Flat gather index of the Hodge dual on 4x4 skew matrices: ``(*X)_ij = X_kl`` with ``ijkl`` an even
    permutation (the diagonal maps to itself: zero for skew ``X``)."""
    index = torch.arange(16)
    for i in range(4):
        for j in range(4):
            if i != j:
                k, l = (x for x in range(4) if x not in (i, j))
                inversions = sum(a > b for n, a in enumerate((i, j, k, l)) for b in (i, j, k, l)[n + 1 :])
                index[4 * i + j] = 4 * k + l if inversions % 2 == 0 else 4 * l + k
    return index


_HODGE_INDEX = _hodge_index()


def _cos_sinc(t2: Tensor) -> tuple[Tensor, Tensor]:
    """``cos t`` and ``sin(t) / t`` from ``t^2``, with Taylor series for small ``t`` (finite gradients at 0)."""
    small = t2 < 1e-3
    t = torch.where(small, torch.ones_like(t2), t2).sqrt()  # safe sqrt: finite gradients at t = 0
    cos = torch.where(small, 1 - t2 / 2 * (1 - t2 / 12 * (1 - t2 / 30)), torch.cos(t))
    sinc = torch.where(small, 1 - t2 / 6 * (1 - t2 / 20 * (1 - t2 / 42)), torch.sin(t) / t)
    return cos, sinc


def _taylor_cans(X: Tensor) -> Tensor:
    shape, b = X.shape, X.shape[-1]
    X = X.reshape(-1, b, b)
    m = _DEGREE[X.dtype]
    unit = torch.finfo(X.dtype).eps / 2
    theta = (unit * math.factorial(m + 1)) ** (1 / (m + 1))
    eye = torch.eye(b, dtype=X.dtype, device=X.device)
    # exact power-of-two prescaling Z = X / 2^k with entries <= 1, so that Z^4 cannot overflow
    k = torch.ceil(torch.log2(X.detach().abs().amax((-2, -1)))).clamp(min=0)
    Z = X * torch.exp2(-k)[:, None, None]
    P = [Z, Z @ Z]
    P += [P[1] @ Z, P[1] @ P[1]]
    # for skew Z, (|Z^4|_F / sqrt 2)^(1/4) bounds the spectral norm (tightly); X / 2^s has norm <= theta
    radius = (torch.linalg.matrix_norm(P[3].detach()) / math.sqrt(2)) ** 0.25
    s = (k + torch.ceil(torch.log2(radius / theta))).clamp(min=0)
    s_min, s_max = _squaring_range(s)
    s_unclamped, s = s, s.clamp(max=s_max)  # a no-op unless compiled or in a torch.func transform
    # P[j] * 2^((j + 1) (k - s)) are the powers of X / 2^s = Z * 2^(k - s) (scaling by powers of two is exact)
    P = [p * torch.exp2((j + 1) * (k - s))[:, None, None] for j, p in enumerate(P)]
    # Paterson-Stockmeyer: sum_k X^k / k! = B_0 + X^4 (B_1 + X^4 (B_2 + ...)), B_j of degree < 4
    coef = [1 / math.factorial(k) for k in range(m + 1)]
    blocks = [
        sum((c * p for c, p in zip(coef[j + 1 : j + 4], P[:3], strict=False)), coef[j] * eye)
        for j in range(0, m + 1, 4)
    ]
    if m % 4 == 0:  # the top block is c_m I: fold it in without a matmul
        blocks.pop()
        blocks[-1] = blocks[-1] + coef[m] * P[3]
    R = blocks.pop()
    while blocks:
        R = torch.baddbmm(blocks.pop(), P[3], R)
    # each squaring doubles the distance to the orthogonal group (~2^s unit after s of them): a CANS step
    # after every POLISH_EVERY squarings squares it back to ~unit, and one more ends the chain. The polish
    # moves R along the normal of the group, and R's derivative lies along the group, so the backward
    # skips it (straight through: gradient identity; the error is of the order of the distance polished away)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():  # few squarings unless a matrix needs more
        R = torch.cond(
            s.amax(0) > _SHORT_CHAIN,
            lambda R, s, eye: _squarings(R, s, eye, 0, s_max),
            lambda R, s, eye: _squarings(R, s, eye, 0, _SHORT_CHAIN),
            (R, s, eye),
        )
    else:
        R = _squarings(R, s, eye, s_min, s_max)
    if in_func_transform():  # no host check there: a matrix beyond the squarings comes out NaN, not wrong
        R = torch.where((s_unclamped > s_max)[:, None, None], torch.nan, R)
    return R.reshape(shape)


def _squarings(R: Tensor, s: Tensor, eye: Tensor, s_min: int, s_max: int) -> Tensor:
    """``R`` squared ``s`` times per matrix (``s_min <= s <= s_max``: the first ``s_min`` unmasked), polished."""
    for i in range(s_max):
        R = R @ R if i < s_min else torch.where((s > i)[:, None, None], R @ R, R)
        if (i + 1) % _POLISH_EVERY == 0 and i + 1 < s_max:
            R = _polish_straight_through(R, eye)
    if s_max:  # unsquared Taylor sums are orthogonal to working precision already
        R = _polish_straight_through(R, eye)
    return R


def reads_nothing() -> bool:
    """True where no value may be read back to the host: under ``torch.compile`` or a ``torch.func`` transform."""
    return torch.compiler.is_compiling() or in_func_transform()


def _squaring_range(s: Tensor) -> tuple[int, int]:
    """``(min s, max s)`` read back in the one host sync, which also rejects non-finite input (NaN/inf ``s``).

    Under ``torch.compile`` nothing is read back: ``(0, COMPILED_SQUARINGS)``, every squaring masked per matrix, and
    an asynchronous check raises when a matrix needs more squarings than that. Inside a ``torch.func`` transform
    likewise, without the check (it has no batching rule): ``_taylor_cans`` returns NaN for such matrices instead.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(
            s.amax(0) <= COMPILED_SQUARINGS,  # a full-tensor amax (no dim) has no ONNX translation
            "skew_expm under torch.compile: a matrix needs more than liere.expm.COMPILED_SQUARINGS squarings "
            "(spectral norm above ~1.6 * 2^COMPILED_SQUARINGS, or non-finite entries); raise it before compiling",
        )
    if reads_nothing():
        return 0, COMPILED_SQUARINGS
    s_min, s_max = torch.stack(s.aminmax()).tolist()
    if not math.isfinite(s_max):
        raise ValueError("A has non-finite entries")
    return int(s_min), int(s_max)


def _polish_straight_through(R: Tensor, eye: Tensor) -> Tensor:
    """One CANS step in the forward, the identity in the backward (``R`` must be near the orthogonal group)."""
    R0 = R.detach()
    return R + (_cans_step(R0, eye) - R0)


def _cans_step(R: Tensor, eye: Tensor) -> Tensor:
    """One optimal odd-cubic step ``R <- a R + b R R^T R`` (CANS) towards the nearest orthogonal matrix.

    With ``d = |R^T R - I|_F`` the singular values lie in ``[l, u] = [sqrt(1-d), sqrt(1+d)]``. The cubic
    ``p(x) = a x + b x^3`` closest to 1 on ``[l, u]`` equioscillates: ``p(l) = p(u) = 1 - E`` and
    ``p(x*) = 1 + E`` at its maximum ``x*^2 = (l^2 + lu + u^2) / 3``, which gives
    ``b = -a / (l^2 + lu + u^2)`` and ``a (2/3 x* + l - l^3 / (l^2 + lu + u^2)) = 2``; the new interval is
    ``[1 - E, 1 + E]`` with ``E`` about half the Newton-Schulz error. For ``d -> 0`` this is Newton-Schulz,
    ``a = 3/2, b = -1/2``. The coefficients are per matrix, act as step sizes and carry no gradient.
    """
    G = R.mT @ R
    with torch.no_grad():
        d = torch.linalg.matrix_norm(G - eye).clamp(max=1)[..., None, None]
        lo, hi = (1 - d).sqrt(), (1 + d).sqrt()
        q = lo * lo + lo * hi + hi * hi
        a = 2 / (2 / 3 * (q / 3).sqrt() + lo - lo**3 / q)
    return a * R - (a / q) * (R @ G)
