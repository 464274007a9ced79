"""Confidence intervals for grids of runs: a method's mean over seeds, and its difference from
a baseline paired by seed (same partition, same training subset, same client batches).

With n values x_1 … x_n, mean x̄ and sample standard deviation s, the 95% interval is
x̄ ± t_{0.975, n−1}·s/√n (Student's t: the seeds are few and σ is unknown). For the paired
difference the same interval is taken over d_j = x_j − b_j, the method's value minus the
baseline's at the same seed j; pairing removes the seed-to-seed spread that both share (the
partition and data subset a seed draws), which is most of it under label skew.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_interval", "paired_interval"]


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval (nan for a single value: no interval)
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def mean_interval(xs: Sequence[float], level: float = 0.95) -> Interval:
    from scipy.stats import t

    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)


def paired_interval(method: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95) -> Interval | None:
    """The interval of method − baseline over the seeds both have; None when they share none."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    return mean_interval([method[s] - baseline[s] for s in seeds], level)
