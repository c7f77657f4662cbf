"""Bootstrap intervals and paired tests against hand-computed values and independent reference computations."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from train.ab.stats import bootstrap_ci, mcnemar_test, sign_flip_test, spearman


def _reference_percentile_bootstrap(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """The standard-library percentile bootstrap (95%) the module used before it moved to SciPy."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    return means[math.floor(0.025 * (resamples - 1))], means[math.ceil(0.975 * (resamples - 1))]


def test_bootstrap_ci_agrees_with_an_independent_bootstrap() -> None:
    values = [0.61, 0.64, 0.59, 0.70, 0.66, 0.63, 0.58, 0.69]
    ours = bootstrap_ci(values, resamples=20_000, seed=1)
    assert ours.low <= ours.mean <= ours.high and ours.n == 8 and ours.mean == pytest.approx(0.6375)
    low, high = _reference_percentile_bootstrap(values, 20_000, seed=1)
    assert ours.low == pytest.approx(low, abs=5e-3) and ours.high == pytest.approx(high, abs=5e-3)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)  # seeded: reproducible


def test_bootstrap_ci_known_distribution_of_two_values() -> None:
    # Resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    assert (bootstrap_ci([0.0, 1.0]).low, bootstrap_ci([0.0, 1.0]).high) == (0.0, 1.0)
    narrow = bootstrap_ci([0.0, 1.0], confidence=0.3)
    assert narrow.low == pytest.approx(0.5) and narrow.high == pytest.approx(0.5)


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
    assert sign_flip_test([0.9], [0.1]) == 1.0  # one pair: both of its 2 sign flips are as extreme
    ten_up = [1.0 + i for i in range(10)]
    assert sign_flip_test(ten_up, [v - 1 for v in ten_up]) == pytest.approx(2 / 1024)
    # diffs 3, -1, 2: sign patterns with |sum| >= 4 are (+,-,+), (+,+,+) and their negations: 4 of 8.
    assert sign_flip_test([3.0, 0.0, 2.0], [0.0, 1.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="paired"):
        sign_flip_test([1.0], [1.0, 2.0])


def test_sign_flip_test_monte_carlo_beyond_exact_enumeration() -> None:
    up = [1.0] * 17  # exact p = 2 / 2^17; 2^17 > the default 2^16 resamples, so this is a seeded estimate
    p = sign_flip_test(up, [0.0] * 17)
    assert 2 / 2**17 <= p < 1e-4 and p == sign_flip_test(up, [0.0] * 17)


def test_mcnemar_is_the_exact_binomial_tail() -> None:
    a = [True] * 30 + [False] * 5 + [True] * 50 + [False] * 15
    b = [False] * 30 + [True] * 5 + [True] * 50 + [False] * 15
    expected = 2 * sum(math.comb(35, i) for i in range(6)) / 2**35  # 5 of 35 discordant pairs go b's way
    assert mcnemar_test(a, b) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_test([True, False], [False, True]) == 1.0
    assert mcnemar_test(a, a) == 1.0
    with pytest.raises(ValueError, match="same examples"):
        mcnemar_test([True], [True, False])


def _pearson_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    xc, rc = x - x.mean(), rows - rows.mean(axis=1, keepdims=True)
    return (rc @ xc) / np.sqrt((rc**2).sum(axis=1) * (xc**2).sum())


def test_spearman_with_ties_matches_average_ranks_and_exact_permutation_p() -> None:
    a = [0.02, 0.09, 0.05, 0.05, 0.07, 0.0, 0.08, 0.03]
    b = [1.0, 0.46, 0.97, 0.87, 0.52, 1.0, 0.78, 0.82]
    ranks_a = np.array([2, 8, 4.5, 4.5, 6, 1, 7, 3])  # ties share their average rank
    ranks_b = np.array([7.5, 1, 6, 5, 2, 7.5, 3, 4])
    rho, p = spearman(a, b)
    expected_rho = _pearson_rows(ranks_a, ranks_b[None])[0]
    assert rho == pytest.approx(expected_rho, abs=1e-12)
    every_pairing = ranks_b[np.array(list(itertools.permutations(range(8))))]
    exact_p = np.mean(np.abs(_pearson_rows(ranks_a, every_pairing)) >= abs(expected_rho) - 1e-12)
    assert p == pytest.approx(exact_p, abs=0.01)  # 10,000 seeded re-pairings against all 8! of them


def test_spearman_small_samples_are_exact_and_constant_input_is_flagged() -> None:
    rho, p = spearman([1, 2, 3, 4], [2, 4, 6, 8])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 24)  # 4! pairings: only +-identity reach |rho|=1
    rho, _ = spearman([1, 2, 3, 4, 5], [5, 3, 4, 1, 2])  # no ties: 1 - 6 sum(d^2) / (n (n^2 - 1))
    assert rho == pytest.approx(1 - 6 * (16 + 1 + 1 + 9 + 9) / 120)
    assert all(v != v for v in spearman([1, 1, 1], [1, 2, 3]))  # NaN rho and p: no ranking on one side
    with pytest.raises(ValueError, match="at least 3 pairs"):
        spearman([1, 2], [1, 2])
