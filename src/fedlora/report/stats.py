"""Confidence intervals for grids of runs: a method's mean over seeds, and its difference from
a baseline paired by seed (same partition, same training subset, same client batches).

With n values x_1 … x_n, mean x̄ and sample standard deviation s, the 95% interval is
x̄ ± t_{0.975, n−1}·s/√n (Student's t: the seeds are few and σ is unknown). For the paired
difference the same interval is taken over d_j = x_j − b_j, the method's value minus the
baseline's at the same seed j; pairing removes the seed-to-seed spread that both share (the
partition and data subset a seed draws), which is most of it under label skew.

Many comparisons at once (every pair of ten methods is 45) make some intervals exclude zero by
chance; :func:`holm` adjusts their p-values (Holm 1979: sort p_(1) ≤ … ≤ p_(m), p̃_(k) =
max_{j≤k} min(1, (m − j + 1)·p_(j))), which bounds the chance of any false call at 5%.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_interval", "paired_interval", "paired_p_value", "holm"]


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


def paired_p_value(method: Mapping[int, float], baseline: Mapping[int, float]) -> float | None:
    """Two-sided p-value of the paired t-test of method − baseline over their shared seeds: t =
    d̄/(s_d/√n) on n − 1 degrees of freedom. None with fewer than two pairs; 1 when every difference is 0,
    0 when they are equal and not 0 (no spread: the sign is certain)."""
    from scipy.stats import t

    seeds = sorted(set(method) & set(baseline))
    if len(seeds) < 2:
        return None
    d = [method[s] - baseline[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
