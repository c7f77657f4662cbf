"""Statistics for comparing encodings: bootstrap confidence intervals and paired tests, on ``scipy.stats``.

Seeded resampling uses NumPy generators (``numpy.random.default_rng(seed)``), so a given ``seed`` draws
different resamples than the standard-library ``random.Random`` the earlier hand-written version used;
exact tests (sign flips with n <= 16, McNemar) give the same p-values as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats


@dataclass(frozen=True)
class Interval:
    """A mean with a confidence interval ``[low, high]`` over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 2, scale: float = 1.0) -> str:
        """``"mean [low, high]"``, values multiplied by ``scale`` (e.g. 100 for percent)."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def _check_values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray([float(v) for v in values])
    if array.size == 0:
        raise ValueError(f"{name} must hold at least one value")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean and percentile-bootstrap confidence interval of ``values`` (e.g. one metric per seed).

    With one value the interval is that value. With few values (3 seeds) the percentile bootstrap is
    narrow-biased; it is what the report shows, alongside the raw per-seed values.
    """
    array = _check_values(values, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, mean, mean, 1)
    result = scipy.stats.bootstrap(
        (array,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile", rng=seed
    )
    interval = result.confidence_interval
    return Interval(mean, float(interval.low), float(interval.high), int(array.size))


def sign_flip_test(a: Sequence[float], b: Sequence[float], resamples: int = 2**16, seed: int = 0) -> float:
    """Two-sided p-value of a paired permutation test that mean(a - b) = 0 (pairs = same seed).

    Exact over all ``2^n`` sign flips of the differences while ``2^n <= resamples`` (n <= 16 by default;
    with 3 seeds the smallest possible p-value is 0.25: few seeds cannot show significance, and the report
    says so); a seeded Monte-Carlo estimate beyond.
    """
    a, b = _check_values(a, "a"), _check_values(b, "b")
    if a.size != b.size:
        raise ValueError(f"a and b must be paired (same length), got {a.size} and {b.size}")
    if a.size == 1:
        return 1.0  # both signs of one difference are as extreme as the observed one
    result = scipy.stats.permutation_test(
        (a - b,),
        lambda d, axis: np.mean(d, axis=axis),
        permutation_type="samples",  # with one sample, 'samples' flips the sign of each observation
        n_resamples=resamples,
        rng=seed,
    )
    return float(result.pvalue)


def mcnemar_test(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: do classifiers a and b differ on the same test examples?

    Only discordant examples count (a right and b wrong, or the reverse); under the null they split
    50/50, so the p-value is an exact binomial test.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(
            f"correct_a and correct_b must cover the same examples, got {len(correct_a)} and {len(correct_b)}"
        )
    only_a = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    if only_a + only_b == 0:
        return 1.0
    return float(scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def spearman(a: Sequence[float], b: Sequence[float], permutations: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Spearman rank correlation of paired values and its two-sided permutation p-value: ``(rho, p)``.

    ``p`` comes from ``permutations`` seeded re-pairings of ``b`` (exact when ``n! <= permutations``),
    counting the observed pairing, so never 0. ``rho`` and ``p`` are NaN when either side is constant.
    """
    a, b = _check_values(a, "a"), _check_values(b, "b")
    if a.size != b.size or a.size < 3:
        raise ValueError(f"a and b must be paired with at least 3 pairs, got {a.size} and {b.size}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    ranks_a, ranks_b = scipy.stats.rankdata(a), scipy.stats.rankdata(b)
    result = scipy.stats.permutation_test(
        (ranks_b,),
        lambda shuffled, axis: scipy.stats.pearsonr(ranks_a, shuffled, axis=axis).statistic,
        permutation_type="pairings",
        n_resamples=permutations,
        rng=seed,
    )
    return float(scipy.stats.spearmanr(a, b).statistic), float(result.pvalue)
