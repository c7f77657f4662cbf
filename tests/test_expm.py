import numpy as np
import pytest
import torch

import liere.expm
from liere.expm import METHODS, orthogonality_error, skew_expm

scipy_linalg = pytest.importorskip("scipy.linalg")

BLOCKS = (2, 3, 4, 8, 16, 64)


def methods_for(b: int) -> list[str]:
    return [m for m in METHODS if m != "closed" or b <= 4]


def random_skew(n: int, b: int, norm, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``n`` random skew ``b x b`` matrices with Frobenius norm ``norm`` (a float or one per matrix)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, b, b, generator=g, dtype=torch.float64)
    M = M - M.mT
    norm = torch.as_tensor(norm, dtype=torch.float64).expand(n)
    return (M / torch.linalg.matrix_norm(M)[:, None, None] * norm[:, None, None]).to(dtype)


def skew_from_upper(u: torch.Tensor, b: int) -> torch.Tensor:
    """Skew matrices ``(..., b, b)`` from their free strict upper triangle ``(..., b(b-1)/2)``."""
    rows, cols = torch.triu_indices(b, b, 1)
    upper = u.new_zeros(*u.shape[:-1], b, b)
    upper[..., rows, cols] = u
    return upper - upper.mT


def rel_error(R: torch.Tensor, A: torch.Tensor) -> float:
    """Max over the stack of ``|R - expm(A)|_F / |expm(A)|_F``, reference: SciPy in fp64."""
    ref = torch.from_numpy(np.stack([scipy_linalg.expm(a) for a in A.double().numpy()]))
    return float((torch.linalg.matrix_norm(R.double() - ref) / A.shape[-1] ** 0.5).max())


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("norm", [0.0, 1e-3, 1.0, 10.0])
def test_fp32_accurate_and_orthogonal(b, norm):
    A = random_skew(16, b, norm)
    for method in methods_for(b):
        R = skew_expm(A, method)
        assert R.shape == A.shape and R.dtype == torch.float32
        assert orthogonality_error(R) <= 1e-5, method
        assert rel_error(R, A) <= 1e-4, method


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("norm", [100.0, 258.0, 1000.0])
def test_fp32_large_norms_stay_orthogonal(b, norm):
    # "exact" (torch.linalg.matrix_exp) drifts past 1e-4 here (see bench.accuracy); these do not
    A = random_skew(16, b, norm)
    for method in ["auto", "taylor_cans"] + (["closed"] if b <= 4 else []):
        assert orthogonality_error(skew_expm(A, method)) <= 1e-4, method


def test_mixed_norms_in_one_stack():
    # per-matrix scaling: small matrices next to huge ones keep full accuracy
    norms = np.logspace(-4, 3, 16)
    A = random_skew(16, 8, norms)
    R = skew_expm(A, "taylor_cans")
    assert orthogonality_error(R) <= 1e-5
    assert rel_error(R[:12], A[:12]) <= 1e-6
    assert rel_error(R, A) <= 1e-4


@pytest.mark.parametrize("b", BLOCKS)
def test_fp64_accurate(b):
    A = random_skew(8, b, np.logspace(-6, 2, 8), dtype=torch.float64)
    for method in methods_for(b):
        R = skew_expm(A, method)
        assert R.dtype == torch.float64
        assert orthogonality_error(R) <= 1e-12, method
        assert rel_error(R, A) <= 1e-12, method


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", BLOCKS)
def test_half_precision_inputs(dtype, b):
    for norm in [1e-2, 1.0, 10.0, 258.0, 1000.0]:
        A = random_skew(16, b, norm, dtype=dtype)
        for method in methods_for(b):
            R = skew_expm(A, method)
            assert R.dtype == dtype
            assert torch.isfinite(R).all(), (method, norm)
            assert orthogonality_error(R) <= 2e-2, (method, norm)


@pytest.mark.parametrize("b", BLOCKS)
def test_autocast_bf16_is_disabled_inside(b):
    for norm in [1.0, 258.0, 1000.0]:
        A = random_skew(16, b, norm)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for method in ["auto", "taylor_cans"] + (["closed"] if b <= 4 else []):
                R = skew_expm(A, method)
                assert R.dtype == torch.float32 and torch.isfinite(R).all()
                assert orthogonality_error(R) <= 1e-4, (method, norm)  # fp32 accuracy, not bf16
            assert orthogonality_error(skew_expm(A, "exact")) <= 2e-2


@pytest.mark.parametrize(
    "b, norms",
    [(2, [0.0, 0.5, 30.0]), (3, [0.0, 1e-2, 0.5, 30.0]), (4, [0.0, 0.5, 30.0]), (8, [1e-3, 3.0, 300.0])],
)
def test_gradcheck(b, norms):
    n = len(norms)
    upper = random_skew(n, b, norms, dtype=torch.float64)
    rows, cols = torch.triu_indices(b, b, 1)
    upper = upper[:, rows, cols].clone().requires_grad_()
    for method in methods_for(b):
        assert torch.autograd.gradcheck(lambda u, m=method: skew_expm(skew_from_upper(u, b), m), (upper,))


def test_closed_forms_match_definitions():
    t = torch.tensor([0.0, 0.3, -2.0, 40.0], dtype=torch.float64)
    A = torch.zeros(4, 2, 2, dtype=torch.float64)
    A[:, 1, 0], A[:, 0, 1] = t, -t
    R = skew_expm(A, "closed")
    torch.testing.assert_close(R[:, 0, 0], torch.cos(t))
    torch.testing.assert_close(R[:, 1, 0], torch.sin(t))
    torch.testing.assert_close(R[:, 0, 1], -torch.sin(t))
    # Rodrigues: the rotation axis is fixed and the angle is |A|_F / sqrt 2
    A = random_skew(8, 3, [0.0, 1e-5, 1e-2, 0.1, 1.0, 3.0, 7.0, 50.0], dtype=torch.float64)
    R = skew_expm(A, "closed")
    axis = torch.stack((A[:, 2, 1], A[:, 0, 2], A[:, 1, 0]), -1)
    torch.testing.assert_close((R @ axis[..., None])[..., 0], axis)
    torch.testing.assert_close(R, skew_expm(A, "exact"), rtol=0, atol=1e-12)


def test_shapes_auto_and_empty():
    A = random_skew(6, 4, 2.0).reshape(2, 3, 4, 4)
    R = skew_expm(A)
    assert R.shape == (2, 3, 4, 4)
    torch.testing.assert_close(R[1, 2], skew_expm(A[1, 2]))
    torch.testing.assert_close(skew_expm(random_skew(1, 2, 1.0)), skew_expm(random_skew(1, 2, 1.0), "closed"))
    assert skew_expm(torch.zeros(0, 8, 8), "taylor_cans").shape == (0, 8, 8)


@pytest.mark.parametrize(
    "A, method, error, match",
    [
        (torch.zeros(4, 4), "bogus", ValueError, "method"),
        (torch.zeros(4), "auto", ValueError, "A"),
        (torch.zeros(2, 3, 4), "auto", ValueError, "A"),
        (torch.zeros(5, 1, 1), "auto", ValueError, "A"),
        (torch.zeros(2, 4, 4, dtype=torch.int64), "auto", TypeError, "A"),
        (torch.zeros(2, 4, 4, dtype=torch.complex64), "auto", TypeError, "A"),
        (torch.full((2, 4, 4), float("nan")), "auto", ValueError, "A"),
        (torch.full((2, 3, 3), float("inf")), "exact", ValueError, "A"),
        (torch.zeros(2, 5, 5), "closed", ValueError, "closed"),
    ],
)
def test_bad_inputs(A, method, error, match):
    with pytest.raises(error, match=match):
        skew_expm(A, method)


def test_closed_form_so4_is_two_commuting_isoclinic_rotations():
    # exp of a self-dual X (X^2 = -a^2 I) is cos(a) I + sin(a)/a X; a mixed X matches SciPy
    A = random_skew(8, 4, [0.0, 1e-6, 1e-2, 0.5, 2.0, 7.0, 40.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(skew_expm(A, "closed"), skew_expm(A, "taylor_cans"), rtol=0, atol=1e-12)
    assert rel_error(skew_expm(A, "closed"), A) <= 1e-12
    X = skew_from_upper(torch.tensor([[0.3, -1.1, 0.7, 0.7, 1.1, 0.3]], dtype=torch.float64), 4)  # x01 = x23 ...
    a = float(torch.linalg.matrix_norm(X)) / 2
    assert torch.allclose(X[0] @ X[0], -(a**2) * torch.eye(4, dtype=torch.float64))
    expected = np.cos(a) * torch.eye(4, dtype=torch.float64) + np.sin(a) / a * X[0]
    torch.testing.assert_close(skew_expm(X, "closed")[0], expected)
    assert skew_expm(torch.zeros(3, 4, 4)).equal(torch.eye(4).expand(3, 4, 4))


@pytest.mark.parametrize("b", [4, 8, 64])
def test_huge_norms_finite_orthogonal_and_accurate(b):
    # the norm bound used to square X^4 entries and overflow past spectral norms ~6.5e4 in fp32
    A = random_skew(3, b, [1e5, 1e6, 1e7])
    for method in ["auto", "taylor_cans"]:
        R = skew_expm(A, method)
        assert torch.isfinite(R).all() and orthogonality_error(R) <= 1e-6, method
        # fp32 scaling and squaring loses ~ norm * unit roundoff (torch.linalg.matrix_exp loses more)
        assert rel_error(R[:2], A[:2]) <= 2 * rel_error(torch.linalg.matrix_exp(A[:2]), A[:2]) + 1e-6, method
    # any finite input: squarings as many as the norm needs, polished along the way
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        R = skew_expm(random_skew(2, b, [1e30, 1e35], dtype=dtype), "taylor_cans")
        assert torch.isfinite(R).all() and orthogonality_error(R) <= tol


@pytest.mark.slow
def test_huge_norms_compiled(monkeypatch):
    monkeypatch.setattr(liere.expm, "COMPILED_SQUARINGS", 24)
    compiled = torch.compile(skew_expm, fullgraph=True, dynamic=False)
    A = random_skew(4, 8, [1.0, 1e5, 1e6, 1e7])
    R = compiled(A, "taylor_cans")
    assert torch.isfinite(R).all() and orthogonality_error(R) <= 1e-6
    torch.testing.assert_close(R[:2], skew_expm(A[:2], "taylor_cans"), rtol=0, atol=1e-5)
    assert rel_error(R, A) <= 2 * rel_error(torch.linalg.matrix_exp(A), A) + 1e-6  # rounding grows with the norm
    # past COMPILED_SQUARINGS the compiled call raises instead of returning NaN or a wrong rotation
    with pytest.raises(RuntimeError, match="COMPILED_SQUARINGS"):
        compiled(random_skew(4, 8, [1.0, 1.0, 1.0, 1e9]), "taylor_cans")


@pytest.mark.parametrize("b", [3, 24, 64])
def test_unpivoted_solve_equals_lapack_for_cayley_systems(b: int) -> None:
    from liere.linalg import solve_unpivoted

    S = random_skew(4, b, [0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    eye = torch.eye(b, dtype=S.dtype)
    expected = torch.linalg.solve(eye + S, eye - S)
    torch.testing.assert_close(solve_unpivoted(eye + S, eye - S), expected, atol=1e-12, rtol=0)
