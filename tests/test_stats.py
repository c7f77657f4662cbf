"""Bootstrap intervals and paired tests against SciPy and hand-computed values."""

from __future__ import annotations

import pytest
import scipy.stats

from train.stats import bootstrap_ci, mcnemar_test, sign_flip_test, spearman


def test_bootstrap_ci_contains_mean_and_matches_scipy() -> None:
    values = [0.61, 0.64, 0.59, 0.70, 0.66, 0.63, 0.58, 0.69]
    ours = bootstrap_ci(values, resamples=20_000, seed=1)
    assert ours.low <= ours.mean <= ours.high and ours.n == 8
    ref = scipy.stats.bootstrap((values,), lambda x: sum(x) / len(x), method="percentile", n_resamples=20_000, rng=0)
    assert abs(ours.low - ref.confidence_interval.low) < 5e-3
    assert abs(ours.high - ref.confidence_interval.high) < 5e-3


def test_bootstrap_ci_edge_cases_and_format() -> None:
    one = bootstrap_ci([0.5])
    assert (one.mean, one.low, one.high) == (0.5, 0.5, 0.5) and one.format(scale=100) == "50.00"
    same = bootstrap_ci([0.25, 0.25, 0.25])
    assert same.low == same.high == 0.25 and same.format(1, 100) == "25.0 [25.0, 25.0]"
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.1, 0.2], confidence=1.5)


def test_sign_flip_test_exact_values() -> None:
    assert sign_flip_test([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(0.25)  # smallest p with 3 pairs
    assert sign_flip_test([1.0, 0.0], [0.0, 1.0]) == 1.0
    ten_up = [1.0 + i for i in range(10)]
    assert sign_flip_test(ten_up, [v - 1 for v in ten_up]) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="paired"):
        sign_flip_test([1.0], [1.0, 2.0])


def test_mcnemar_matches_scipy_binomial() -> None:
    a = [True] * 30 + [False] * 5 + [True] * 50 + [False] * 15
    b = [False] * 30 + [True] * 5 + [True] * 50 + [False] * 15
    expected = scipy.stats.binomtest(5, 35, 0.5).pvalue
    assert mcnemar_test(a, b) == pytest.approx(expected)
    assert mcnemar_test(a, a) == 1.0
    with pytest.raises(ValueError, match="same examples"):
        mcnemar_test([True], [True, False])


def test_spearman_matches_scipy_with_ties_and_flags_constant_input() -> None:
    a = [0.02, 0.09, 0.05, 0.05, 0.07, 0.0, 0.08, 0.03]
    b = [1.0, 0.46, 0.97, 0.87, 0.52, 1.0, 0.78, 0.82]
    rho, p = spearman(a, b)
    reference = scipy.stats.spearmanr(a, b)
    assert rho == pytest.approx(reference.statistic, abs=1e-12)
    statistic = lambda y: scipy.stats.spearmanr(a, y).statistic  # noqa: E731
    exact = scipy.stats.permutation_test(
        (b,), statistic, permutation_type="pairings", n_resamples=50_000, random_state=0
    )
    assert p == pytest.approx(exact.pvalue, abs=0.01)  # Monte-Carlo permutation p-values agree
    assert spearman([1, 2, 3, 4], [2, 4, 6, 8])[0] == pytest.approx(1.0)
    assert all(v != v for v in spearman([1, 1, 1], [1, 2, 3]))  # NaN rho and p: no ranking on one side
    with pytest.raises(ValueError, match="at least 3 pairs"):
        spearman([1, 2], [1, 2])
