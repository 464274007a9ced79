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

Two cases decide nothing. A seed whose value is not finite (a diverged run's NaN metric) is left
out of the mean and of the pairs, and counted (``diverged``); a comparison that lost a seed that
way gets no verdict and no test, since dropping the seeds where a method diverged would judge it on
its good seeds only. Differences with no spread (every seed the same difference, as a 0.25-point
step of a small dev set can give) have no t-test: p is NaN, the interval has zero width and
excludes nothing. NaN p-values stay out of Holm's family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_interval", "finite_interval", "paired_interval", "paired_p_value", "holm"]


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval (nan for a single value: no interval)
    n: int
    diverged: int = 0  # values (seeds) left out because they were not finite

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.diverged == 0 and self.n > 1 and self.half > 0 and (self.low > 0 or self.high < 0)


def mean_interval(xs: Sequence[float], level: float = 0.95) -> Interval:
    from scipy.stats import t

    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = _sd(xs, mean)
    return Interval(mean, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)


def finite_interval(xs: Sequence[float], level: float = 0.95) -> Interval:
    """:func:`mean_interval` of the finite values, counting the others as ``diverged`` (no finite
    value: mean and half-width NaN, n = 0)."""
    kept = [x for x in xs if math.isfinite(x)]
    diverged = len(xs) - len(kept)
    if not kept:
        return Interval(math.nan, math.nan, 0, diverged)
    iv = mean_interval(kept, level)
    return Interval(iv.mean, iv.half, iv.n, diverged)


def _sd(xs: Sequence[float], mean: float) -> float:
    """The sample standard deviation, 0 where the spread is round-off of equal values."""
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return 0.0 if sd <= 1e-9 * max(1.0, abs(mean)) else sd


def _differences(method: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """method − baseline at each seed both have (NaN where either diverged)."""
    return [method[s] - baseline[s] for s in sorted(set(method) & set(baseline))]


def paired_interval(method: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95) -> Interval | None:
    """The interval of method − baseline over the seeds both have with a finite difference, the
    others counted as ``diverged`` (no verdict then); None when the two share no seed."""
    d = _differences(method, baseline)
    return finite_interval(d, level) if d else None


def paired_p_value(method: Mapping[int, float], baseline: Mapping[int, float]) -> float | None:
    """Two-sided p-value of the paired t-test of method − baseline over their shared seeds (finite
    differences): t = d̄/(s_d/√n) on n − 1 degrees of freedom. None with fewer than two pairs; NaN
    when a shared seed diverged or the differences have no spread (no test: the module's docstring)."""
    from scipy.stats import t

    d = _differences(method, baseline)
    if len([x for x in d if math.isfinite(x)]) < 2:
        return None
    if not all(math.isfinite(x) for x in d):
        return math.nan
    n = len(d)
    mean = sum(d) / n
    sd = _sd(d, mean)
    if sd == 0:
        return math.nan
    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order; the family is the finite ones
    (a NaN stays NaN and counts in no one's m)."""
    finite = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    m = len(finite)
    order = sorted(finite, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
