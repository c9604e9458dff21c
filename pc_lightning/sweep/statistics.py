"""Seed statistics for ablation reports: mean ± standard deviation, paired t-intervals, per-step seed bands.

A variant is compared with the reference variant on *paired* runs: the same optimizer and the same seed, so
both saw the same data order (the training windows are a function of ``trainer.seed``). For the n paired
differences d_i = x_i(variant) - x_i(reference) the 95% Student t-interval is

    d_mean ± t_{0.975, n-1} * s_d / sqrt(n),   s_d = sample standard deviation of the d_i (ddof = 1),

Student's interval for the mean of a paired difference (Student 1908, "The probable error of a mean"). With
n = 1 there is no interval; a constant difference gives a zero-width interval at that difference. The
interval *excludes zero* (a difference the seeds resolve) when both ends are on the same side of 0.

Nothing here knows about runs or MLflow: values come in as ``{pairing key: value}`` mappings.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None below 2 values) and count of a set of seed values."""

    mean: float | None
    sd: float | None
    n: int


def spread(values: Iterable[float]) -> Spread:
    values = list(values)
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value in {values}")
    if not values:
        return Spread(None, None, 0)
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value t_{(1+confidence)/2, n-1} for a sample of n >= 2."""
    from scipy.stats import t

    if n < 2:
        raise ValueError("a t-interval needs at least 2 values")
    return float(t.ppf(0.5 + confidence / 2, n - 1))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the paired differences with its t-interval (low/high None when fewer than 2 pairs).

    ``unpaired``: values that had no partner on the other side (a seed missing there) and were left out.
    """

    mean: float | None
    low: float | None
    high: float | None
    n: int
    unpaired: int = 0
    confidence: float = CONFIDENCE

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or entirely below 0; False without an interval."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def mean_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Student t-interval for the mean of ``values`` (here: already-paired differences)."""
    s = spread(values)
    if s.n < 2:
        return PairedDifference(s.mean, None, None, s.n, confidence=confidence)
    half = t_quantile(s.n, confidence) * s.sd / math.sqrt(s.n)
    return PairedDifference(s.mean, s.mean - half, s.mean + half, s.n, confidence=confidence)


def paired_difference(variant: Mapping[Hashable, float], reference: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """variant - reference over the keys both sides have, with the t-interval of the paired differences."""
    common = [k for k in variant if k in reference]
    diffs = [variant[k] - reference[k] for k in common]
    unpaired = len(variant) + len(reference) - 2 * len(common)
    result = mean_interval(diffs, confidence)
    return PairedDifference(result.mean, result.low, result.high, result.n, unpaired, confidence)


@dataclass(frozen=True)
class Band:
    """Per-step mean, minimum and maximum over seeds, and how many seeds had a value at that step."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    n: list[int]


def seed_band(curves: Iterable[Mapping[int, float]]) -> Band:
    """Combine ``{step: value}`` curves of several seeds; non-finite values (a diverged run) are skipped."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve.items():
            if value is not None and math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return Band(steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
                [max(by_step[s]) for s in steps], [len(by_step[s]) for s in steps])
