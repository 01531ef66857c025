"""Seed statistics: mean ± std, and the paired difference of two rows with a 95 % interval.

Seeds pair two rows: the same split, the same seed, the same shared stages, so the difference of a
pair removes what the seed does to both. The interval is Student's t on the paired differences
(n - 1 degrees of freedom); a difference whose interval contains 0 is no difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# two-sided 95 % quantiles of Student's t, by degrees of freedom (beyond 30: the normal's 1.96)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float
    low: float | None  # 95 % interval; None with one pair
    high: float | None

    @property
    def verdict(self) -> str:
        if self.low is None:
            return "one seed: no interval"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no difference"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """a - b over the seeds both have; None when they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    if std is None:
        return Paired(1, mean, None, None)
    half = T975.get(len(diffs) - 1, 1.96) * std / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half)
