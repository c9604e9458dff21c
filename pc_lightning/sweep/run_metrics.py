"""Per-run metrics an ablation summarises besides its losses: the ``metrics:`` section of an ablation file.

Each entry names an MLflow metric and how the run's history of it becomes one number per run::

    metrics:
      gmcn: {key: spectrum/gmcn, reduce: mean}                      # mean over the logged steps
      max_attn_logit: {key: "attn/max_logit/*", reduce: max, lr: 0.1, scale: log}
      steps_to_target: {key: val/loss, reduce: first_step_at_or_below, threshold: 5.0, scale: log}

``key`` may be a glob (``attn/max_logit/*``: every block's key, pooled). Reductions over the logged values x_t
(steps t; several keys pooled):

    last, first, mean, max, min     the obvious ones (``last``/``first``: of the latest/earliest step)
    max_abs, last_abs               max_t |x_t|, |x_last|
    drift                           |x_last - x_first|
    max_over_median                 max_t x_t / median_t x_t (how far the largest value stands out)
    first_step_at_or_below          the first step t with x_t <= threshold (None if never: the run did not get there)
    growth                          mean of the last quarter of the history / mean of its first quarter

``after_step`` drops the values logged before that step (e.g. the warmup). ``lr`` reads the metric from the run at
that learning rate of an LR grid (default: the group's row LR, where its loss columns are read). ``scale: log``
compares the metric as a ratio: geometric mean over seeds and a paired t-interval on the ln ratios, as the max
stable LR. The report shows each metric as mean ± sd over seeds and the paired difference (or ratio) against the
reference variant (:mod:`pc_lightning.sweep.report`).
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Optional

Reduce = Literal["last", "first", "mean", "max", "min", "max_abs", "last_abs", "drift", "max_over_median",
                 "first_step_at_or_below", "growth"]


@dataclass
class MetricSpec:
    key: str  # MLflow metric name, or a glob over the run's metric names
    reduce: Reduce = "last"
    threshold: Optional[float] = None  # for first_step_at_or_below
    lr: Optional[float] = None  # read at this LR of the grid (None: the group's row LR)
    after_step: int = 0  # ignore values logged before this step
    scale: Literal["linear", "log"] = "linear"  # log: compared as ratios (geometric mean, t-interval on ln)
    description: str = ""  # one line for the report

    def check(self, name: str) -> None:
        from pc_lightning.config import ConfigError

        if self.reduce == "first_step_at_or_below" and self.threshold is None:
            raise ConfigError(f"metrics.{name}.threshold", "first_step_at_or_below needs a threshold")
        if self.reduce != "first_step_at_or_below" and self.threshold is not None:
            raise ConfigError(f"metrics.{name}.threshold", "only used with reduce: first_step_at_or_below")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"metrics.{name}.lr", "must be positive")
        if self.after_step < 0:
            raise ConfigError(f"metrics.{name}.after_step", "must be >= 0")

    @property
    def is_pattern(self) -> bool:
        return any(c in self.key for c in "*?[")

    def keys(self, available: Iterable[str]) -> list[str]:
        """The run's metric names this spec reads."""
        if not self.is_pattern:
            return [self.key] if self.key in set(available) else []
        return sorted(k for k in available if fnmatch.fnmatchcase(k, self.key))


def reduce_history(spec: MetricSpec, points: list[tuple[int, float]]) -> float | None:
    """One number from ``(step, value)`` points (several keys pooled); None when there is nothing to reduce or,
    for first_step_at_or_below, when no value reaches the threshold. Non-finite values (logged by a run that
    blew up) are dropped: the statistics need numbers, and such a run is counted as diverged anyway."""
    finite = sorted((s, v) for s, v in points if s >= spec.after_step and math.isfinite(v))
    values = [v for _, v in finite]
    r = spec.reduce
    if r == "first_step_at_or_below":
        return next((float(s) for s, v in finite if v <= spec.threshold), None)
    if not values:
        return None
    if r == "last":
        return _at(finite, max)
    if r == "first":
        return _at(finite, min)
    if r == "mean":
        return statistics.fmean(values)
    if r == "max":
        return max(values)
    if r == "min":
        return min(values)
    if r == "max_abs":
        return max(abs(v) for v in values)
    if r == "last_abs":
        return abs(_at(finite, max))
    if r == "drift":
        return abs(_at(finite, max) - _at(finite, min))
    if r == "max_over_median":
        median = statistics.median(values)
        return max(values) / median if median > 0 else None
    if r == "growth":
        quarter = max(1, len(values) // 4)
        first, last = statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])
        return last / first if first > 0 else None
    raise ValueError(f"unknown reduction {r}")


def _at(points: list[tuple[int, float]], pick) -> float:
    """The value at the latest (pick=max) or earliest (pick=min) step; several keys there: their mean."""
    step = pick(s for s, _ in points)
    return statistics.fmean(v for s, v in points if s == step)


def run_metric(mlflow_client, run, spec: MetricSpec) -> float | None:
    """The reduced value of ``spec`` for one MLflow run (its full metric histories)."""
    points: list[tuple[int, float]] = []
    for key in spec.keys(run.data.metrics):
        points += [(m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, key)]
    return reduce_history(spec, points)
