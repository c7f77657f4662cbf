"""Statistics for comparing encodings: bootstrap confidence intervals and paired tests.

Standard library only, so reports can be rebuilt anywhere from results.json.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


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


def _check_values(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} must hold at least one value")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{name} contains NaN")
    return values


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean and percentile-bootstrap confidence interval of ``values`` (e.g. one metric per seed).

    With one value the interval is that value. With few values (3 seeds) the percentile bootstrap is
    narrow-biased; it is what the report shows, alongside the raw per-seed values.
    """
    values = _check_values(values, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Interval(mean, mean, mean, 1)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return Interval(mean, low, high, n)


def sign_flip_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of a paired permutation test that mean(a - b) = 0 (pairs = same seed).

    Exact over all ``2^n`` sign flips of the differences for n <= 16 (so with 3 seeds the smallest
    possible p-value is 0.25: few seeds cannot show significance, and the report says so).
    """
    a, b = _check_values(a, "a"), _check_values(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired (same length), got {len(a)} and {len(b)}")
    if len(a) > 16:
        raise ValueError(f"sign_flip_test enumerates 2^n flips; n={len(a)} > 16")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    observed = abs(sum(diffs))
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    extreme = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12 for signs in flips)
    return extreme / len(flips)


def mcnemar_test(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: do classifiers a and b differ on the same test examples?

    Only discordant examples count (a right and b wrong, or the reverse); under the null they split
    50/50, so the p-value is an exact binomial tail.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(
            f"correct_a and correct_b must cover the same examples, got {len(correct_a)} and {len(correct_b)}"
        )
    only_a = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n with ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return cov / norm if norm > 0 else float("nan")


def spearman(a: Sequence[float], b: Sequence[float], permutations: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Spearman rank correlation of paired values and its two-sided permutation p-value: ``(rho, p)``.

    ``p`` is the share of ``permutations`` seeded shuffles of ``b`` whose |rho| reaches the observed one
    (counting the observed pairing, so never 0). ``rho`` is NaN when either side is constant.
    """
    a, b = _check_values(a, "a"), _check_values(b, "b")
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"a and b must be paired with at least 3 pairs, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    rho = _pearson(ra, rb)
    if math.isnan(rho):
        return rho, float("nan")
    rng, shuffled, extreme = random.Random(seed), list(rb), 1
    for _ in range(permutations):
        rng.shuffle(shuffled)
        extreme += abs(_pearson(ra, shuffled)) >= abs(rho) - 1e-12
    return rho, extreme / (permutations + 1)
