"""``pcl report``: render an ablation's ``results/<name>/`` or a study's ``results/sweeps/<name>/``.

Everything is read back from storage -- MLflow runs (tags, params, metric histories) and, for studies, the
Optuna storage named by the parent run's ``pcl.storage`` tag; nothing is recomputed or re-trained. ``pcl
ablate`` and ``pcl sweep`` call the same functions at the end, so their output and ``pcl report`` agree.

Ablation summary, one row per variant x optimizer (with several LRs, at the LR of lowest mean final loss):
final and best val loss as mean ± sd over seeds and n, perplexity exp(mean final loss), tokens/s, parameters,
loss spikes (``spike/count``) and diverged runs; then every variant against the reference variant with the same
optimizer, as the mean paired difference over seeds with a 95% t-interval; with an LR grid, the maximum stable
LR and the Wortsman LR sensitivity (:mod:`pc_lightning.sweep.lr_sensitivity`, l0 = the loss at initialisation) per seed,
aggregated and compared the same way. The arithmetic is in :mod:`pc_lightning.sweep.statistics`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean

import yaml

from pc_lightning import tracking
from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.secrets import without_masked_password
from pc_lightning.sweep import runs
from pc_lightning.sweep.lr_sensitivity import capped_loss, lr_sensitivity, max_stable_lr
from pc_lightning.sweep.run_metrics import MetricSpec, run_metric
from pc_lightning.sweep.space import is_journal
from pc_lightning.sweep.statistics import PairedDifference, Spread, paired_difference, seed_band, spread
from pc_lightning.tracked_run import RunStatus

DONE = (RunStatus.FINISHED, RunStatus.DIVERGED)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------------


@dataclass
class RunRow:
    key: str
    variant: str
    optimizer: str
    lr: float
    seed: int
    status: str  # finished | diverged | failed | killed | running
    final_val_loss: float | None
    best_val_loss: float | None
    tokens_per_sec: float | None
    parameters: int | None
    spikes: float | None
    last_val_step: int | None  # MLflow step of the last validation
    vocab: int | None
    run_id: str
    error: str = ""
    first_loss: float | None = None  # train/initial_loss: the training loss at initialisation (first step)
    metrics: dict[str, float | None] = field(default_factory=dict)  # the ablation's metrics: (run_metrics)

    @property
    def initial_loss(self) -> float | None:
        """l0 of the LR sensitivity: the loss at initialisation as Wortsman et al. define it, i.e. the run's first
        training loss; ln(vocab) (a uniform predictor's loss) for runs recorded before it was logged."""
        if self.first_loss is not None and math.isfinite(self.first_loss):
            return self.first_loss
        return math.log(self.vocab) if self.vocab else None


def _run_status(run) -> str:
    return RunStatus.of(run) or "running"


def run_row(mlflow_client, run, specs: dict[str, MetricSpec] | None = None) -> RunRow:
    """One run's row; ``specs``: the ablation's extra metrics, each reduced from the run's history."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    history = sorted(mlflow_client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: (m.step, m.timestamp))
    values = [m.value for m in history]
    finite = [v for v in values if math.isfinite(v)]
    parameters = params.get("derived.parameters")
    vocab = params.get("model.vocab_size")
    return RunRow(
        key=tags.get("pcl.key", run.info.run_id), variant=tags.get("pcl.variant", "?"),
        optimizer=tags.get("pcl.optimizer", "?"), lr=float(tags.get("pcl.lr") or params.get("optim.lr") or "nan"),
        seed=int(tags.get("pcl.seed", "0")), status=_run_status(run),
        final_val_loss=values[-1] if values else None, best_val_loss=min(finite) if finite else None,
        tokens_per_sec=metrics.get("perf/tokens_per_sec"),
        parameters=int(parameters) if parameters not in (None, "None") else None,
        spikes=metrics.get("spike/count"), last_val_step=history[-1].step if history else None,
        vocab=int(vocab) if vocab not in (None, "None") else None, run_id=run.info.run_id,
        error=tags.get("error", "") or tags.get("diverged_message", ""), first_loss=metrics.get("train/initial_loss"),
        metrics={name: run_metric(mlflow_client, run, spec) for name, spec in (specs or {}).items()})


def select_runs(rows: list[RunRow]) -> list[RunRow]:
    """One run per key: the newest finished/diverged one, else the newest attempt (rows are oldest first)."""
    chosen: dict[str, RunRow] = {}
    for row in rows:
        current = chosen.get(row.key)
        if current is None or row.status in DONE or current.status not in DONE:
            chosen[row.key] = row
    return list(chosen.values())


@dataclass
class GroupSummary:
    """One variant x optimizer over its seeds. Loss values are per seed at the group's LR (``lr``), capped at l0
    (a diverged run counts as l0); the LR-grid values are per seed over the whole grid."""

    variant: str
    optimizer: str
    lr: float | None  # the LR with the lowest mean final loss (the only one without an LR grid)
    final_by_seed: dict[int, float]
    best_by_seed: dict[int, float]
    tokens_per_sec: float | None
    parameters: int | None
    spikes: float | None
    diverged: int
    runs: int
    failed: int
    lr_grid: list[float]  # every LR this group was run at (failed runs included)
    losses_by_lr: dict[float, Spread]  # capped final loss over the seeds with a result, per LR
    diverged_by_lr: dict[float, int]
    max_stable_lr_by_seed: dict[int, float]  # seeds with a complete grid and a stable LR
    lr_sensitivity_by_seed: dict[int, float]  # seeds with a complete grid
    incomplete_seeds: list[int]  # seeds without a result at every LR of the grid: no LR statistics
    no_stable_lr_seeds: list[int]  # complete seeds where every LR diverged or ended at or above l0
    # the ablation's metrics: per metric, the value per seed (at the metric's LR, else the row LR), and the seeds
    # whose run had no value (e.g. never reached a first_step_at_or_below threshold)
    metrics_by_seed: dict[str, dict[int, float]] = field(default_factory=dict)
    metrics_missing: dict[str, list[int]] = field(default_factory=dict)

    @property
    def final_val_loss(self) -> Spread:
        return spread(self.final_by_seed.values())

    @property
    def best_val_loss(self) -> Spread:
        return spread(self.best_by_seed.values())

    @property
    def val_ppl(self) -> float | None:
        """exp(mean final loss): the geometric mean of the seeds' perplexities."""
        mean_loss = self.final_val_loss.mean
        return math.exp(mean_loss) if mean_loss is not None else None

    @property
    def has_lr_grid(self) -> bool:
        return len(self.lr_grid) > 1

    @property
    def max_stable_lr_log(self) -> Spread:
        """Mean ± sd of ln(max stable LR): exp(mean) is the geometric mean, exp(sd) the geometric sd factor."""
        return spread(math.log(lr) for lr in self.max_stable_lr_by_seed.values())

    @property
    def lr_sensitivity(self) -> Spread:
        return spread(self.lr_sensitivity_by_seed.values())


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return mean(values) if values else None


def run_final_loss(row: RunRow, l0: float | None) -> float | None:
    """A run's final val loss for the statistics: l0 if it diverged, else capped at l0. None (left out): a run
    without a validation, or, without l0 (unknown vocabulary), a diverged run or a non-finite loss."""
    if row.status == "diverged":
        return l0
    if row.final_val_loss is None:
        return None
    if l0 is not None:
        return capped_loss(row.final_val_loss, l0)
    return row.final_val_loss if math.isfinite(row.final_val_loss) else None


def run_best_loss(row: RunRow, l0: float | None) -> float | None:
    """Best val loss, capped at l0 (a diverged run keeps the best validation it reached before diverging)."""
    if l0 is not None:
        return capped_loss(row.best_val_loss, l0)
    return row.best_val_loss if row.best_val_loss is not None and math.isfinite(row.best_val_loss) else None


def _by_seed(rows: list[RunRow], value) -> dict[int, float]:
    out = {}
    for r in rows:
        v = value(r)
        if v is not None:
            out[r.seed] = v
    return out


def final_loss(row: RunRow) -> float | None:
    """:func:`run_final_loss` at the run's own l0."""
    return run_final_loss(row, row.initial_loss)


def summarize(variant: str, optimizer: str, rows: list[RunRow], specs: dict[str, MetricSpec] | None = None,
              stable_fraction: float = 0.0) -> GroupSummary:
    results = [r for r in rows if r.status in DONE]
    grid = sorted({r.lr for r in rows if math.isfinite(r.lr)})  # a run that failed before it had an LR: NaN
    by_lr: dict[float, list[RunRow]] = {lr: [r for r in results if r.lr == lr] for lr in grid}
    losses = {lr: spread(_by_seed(rs, final_loss).values()) for lr, rs in by_lr.items() if rs}
    # the row's LR: the lowest mean final loss over seeds (a diverged seed counts as l0)
    best_lr = min((lr for lr in losses if losses[lr].n), key=lambda lr: losses[lr].mean, default=None)
    at_best = by_lr.get(best_lr, [])

    # LR sensitivity and max stable LR per seed, over the whole grid; only seeds with a result at every LR
    lr_sens, max_lr, incomplete, no_stable = {}, {}, [], []
    if len(grid) > 1:
        for seed in sorted({r.seed for r in rows}):
            mine = [r for r in results if r.seed == seed]
            l0s = [r.initial_loss for r in mine if r.initial_loss is not None]
            l0 = mean(l0s) if l0s else None  # one init and first batch per seed: the same l0 at every LR
            per_lr = {r.lr: final_loss(r) for r in mine}
            per_lr = {lr: loss for lr, loss in per_lr.items() if loss is not None}  # diverged = l0: unstable
            if l0 is None or set(per_lr) != set(grid):
                incomplete.append(seed)
                continue
            lr_sens[seed] = lr_sensitivity(per_lr, l0)
            stable = max_stable_lr(per_lr, l0, stable_fraction)
            if stable is None:
                no_stable.append(seed)
            else:
                max_lr[seed] = stable

    metrics_by_seed, metrics_missing = {}, {}
    for name, spec in (specs or {}).items():
        at = by_lr.get(spec.lr, []) if spec.lr is not None else at_best
        metrics_by_seed[name] = _by_seed(at, lambda r: r.metrics.get(name))
        metrics_missing[name] = sorted(r.seed for r in at if r.metrics.get(name) is None)

    spikes = [r.spikes for r in results if r.spikes is not None]
    return GroupSummary(
        variant=variant, optimizer=optimizer, lr=best_lr,
        final_by_seed=_by_seed(at_best, final_loss),
        best_by_seed=_by_seed(at_best, lambda r: run_best_loss(r, r.initial_loss)),
        tokens_per_sec=_mean([r.tokens_per_sec for r in results if r.status == "finished"]),
        parameters=next((r.parameters for r in rows if r.parameters), None),
        spikes=sum(spikes) if spikes else None,
        diverged=sum(r.status == "diverged" for r in results), runs=len(results), failed=len(rows) - len(results),
        lr_grid=grid, losses_by_lr=losses,
        diverged_by_lr={lr: sum(r.status == "diverged" for r in rs) for lr, rs in by_lr.items()},
        max_stable_lr_by_seed=max_lr, lr_sensitivity_by_seed=lr_sens, incomplete_seeds=incomplete,
        no_stable_lr_seeds=no_stable, metrics_by_seed=metrics_by_seed, metrics_missing=metrics_missing)


@dataclass
class Comparison:
    """A group against the reference variant with the same optimizer, paired by seed (None: no reference)."""

    group: GroupSummary
    reference: GroupSummary | None
    final_val_loss: PairedDifference | None
    best_val_loss: PairedDifference | None
    lr_sensitivity: PairedDifference | None
    max_stable_lr_log: PairedDifference | None  # of ln LR: exp(mean) is the geometric-mean ratio
    metrics: dict[str, PairedDifference] = field(default_factory=dict)  # the ablation's metrics (ln for scale: log)

    @property
    def is_reference(self) -> bool:
        return self.reference is self.group


# What a comparison (or a claim check) can be about: the loss columns, the LR-grid statistics, or a metric of the
# ablation's metrics: section. Log-scale measures are compared as ratios (paired differences of their logarithms).
LOSS_MEASURES = ("final_val_loss", "best_val_loss", "lr_sensitivity", "max_stable_lr")


def measure_by_seed(g: GroupSummary, measure: str) -> dict[int, float]:
    """The per-seed values of ``measure`` for one group (a loss column, an LR-grid statistic or a metric name)."""
    if measure == "final_val_loss":
        return g.final_by_seed
    if measure == "best_val_loss":
        return g.best_by_seed
    if measure == "lr_sensitivity":
        return g.lr_sensitivity_by_seed
    if measure == "max_stable_lr":
        return g.max_stable_lr_by_seed
    if measure in g.metrics_by_seed:
        return g.metrics_by_seed[measure]
    raise KeyError(measure)


def is_log_scale(measure: str, specs: dict[str, MetricSpec] | None = None) -> bool:
    return measure == "max_stable_lr" or (measure in (specs or {}) and specs[measure].scale == "log")


def paired_measure(group: GroupSummary, reference: GroupSummary, measure: str, log: bool = False) -> PairedDifference:
    """group − reference paired by seed (``log``: ln group − ln reference, seeds with a non-positive value left
    out as unpaired)."""
    a, b = measure_by_seed(group, measure), measure_by_seed(reference, measure)
    if log:
        a = {s: math.log(v) for s, v in a.items() if v > 0}
        b = {s: math.log(v) for s, v in b.items() if v > 0}
    return paired_difference(a, b)


def compare(group: GroupSummary, reference: GroupSummary | None,
            specs: dict[str, MetricSpec] | None = None) -> Comparison:
    """Paired differences group - reference over the seeds both have (each side at its own row LR)."""
    if reference is None:
        return Comparison(group, None, None, None, None, None)
    grid = group.has_lr_grid and reference.has_lr_grid
    return Comparison(
        group, reference,
        final_val_loss=paired_measure(group, reference, "final_val_loss"),
        best_val_loss=paired_measure(group, reference, "best_val_loss"),
        lr_sensitivity=paired_measure(group, reference, "lr_sensitivity") if grid else None,
        max_stable_lr_log=paired_measure(group, reference, "max_stable_lr", log=True) if grid else None,
        metrics={name: paired_measure(group, reference, name, is_log_scale(name, specs)) for name in specs or {}})


def compare_all(groups: list[GroupSummary], reference: str,
                specs: dict[str, MetricSpec] | None = None) -> list[Comparison]:
    """Every group against ``reference`` x the same optimizer."""
    refs = {g.optimizer: g for g in groups if g.variant == reference}
    return [compare(g, refs.get(g.optimizer), specs) for g in groups]


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_spread(s: Spread, spec: str) -> str:
    """'mean ± sd'; one value alone; '–' for none."""
    if s.n == 0:
        return "–"
    return format(s.mean, spec) if s.sd is None else f"{format(s.mean, spec)} ± {format(s.sd, spec)}"


def _fmt_geometric(s: Spread) -> str:
    """A spread of ln values as 'geometric mean ×/÷ geometric sd factor'."""
    if s.n == 0:
        return "–"
    return f"{math.exp(s.mean):.3g}" if s.sd is None else f"{math.exp(s.mean):.3g} ×/÷ {math.exp(s.sd):.2f}"


MARKER = "*"


def _fmt_difference(d: PairedDifference | None, spec: str, ratio: bool = False) -> str:
    """'mean [low, high] *' (the marker when the interval excludes 0); a single pair has no interval.
    ratio: d is a difference of ln values, shown as the ratio exp(d) (the marker: the interval excludes 1)."""
    if d is None or d.n == 0:
        return "–"
    show = (lambda v: f"{math.exp(v):.3g}×") if ratio else (lambda v: format(v, spec))
    if not d.has_interval:
        return f"{show(d.mean)} (1 seed: no CI)"
    return f"{show(d.mean)} [{show(d.low)}, {show(d.high)}]" + (f" {MARKER}" if d.excludes_zero else "")


def _fmt_pairs(d: PairedDifference | None) -> str:
    if d is None:
        return "–"
    return str(d.n) + (f" ({d.unpaired} unpaired)" if d.unpaired else "")


def _seed_list(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def summary_markdown(name: str, groups: list[GroupSummary], rows: list[RunRow], reference: str | None = None,
                     specs: dict[str, MetricSpec] | None = None, stable_fraction: float = 0.0) -> str:
    reference = reference or (groups[0].variant if groups else None)
    comparisons = compare_all(groups, reference, specs)
    seeds = sorted({r.seed for r in rows})
    most = max((g.final_val_loss.n for g in groups), default=0)
    lines = [f"# Ablation `{name}`", "",
             f"{sum(g.runs for g in groups)} runs with results, {sum(g.diverged for g in groups)} diverged, "
             f"{sum(g.failed for g in groups)} failed; seeds {_seed_list(seeds)}. Reference variant: "
             f"`{reference}`.", ""]
    if most <= 1:
        lines += ["**1 seed: no confidence interval.** The table shows single runs and the differences below are "
                  "single-seed differences; run the ablation with several `seeds:` for mean ± sd and intervals.",
                  ""]
    lines += [
        "## Mean over seeds", "",
        "Loss columns: mean ± sample standard deviation over the n seeds with a result at the row's LR (the LR "
        "with the lowest mean final loss when the ablation has an LR grid). A diverged run counts as "
        "l0 (the loss at initialisation: the run's first training loss, else ln(vocab)) and a loss above l0 is capped at l0 (as in the LR sensitivity); failed and missing runs "
        "are left out. val ppl = exp(mean final val loss). tokens/s: mean over finished runs; spikes: total over "
        "all runs.", "",
        "| variant | optimizer | LR | n | final val loss | best val loss | val ppl | tokens/s | params | spikes "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        if g.runs == 0:
            lines.append(f"| {g.variant} | {g.optimizer} | failed | 0 | | | | | | | |")
            continue
        diverged = "no" if g.diverged == 0 else f"yes ({g.diverged}/{g.runs})"
        lines.append(
            f"| {g.variant} | {g.optimizer} | {_fmt(g.lr, 'g')} | {g.final_val_loss.n} "
            f"| {_fmt_spread(g.final_val_loss, '.4f')} | {_fmt_spread(g.best_val_loss, '.4f')} "
            f"| {_fmt(g.val_ppl, '.1f')} | {_fmt(g.tokens_per_sec, ',.0f')} | {_fmt_params(g.parameters)} "
            f"| {_fmt(g.spikes, '.0f')} | {diverged} |")

    lines += [
        "", f"## Paired differences vs `{reference}`", "",
        f"Δ = variant − `{reference}` with the same optimizer, on runs paired by seed (same seed = same data "
        "order; each side at its own row LR). Cells: mean of the paired differences [95% Student t-interval "
        "mean ± t(0.975, n−1)·sd/√n on the paired differences]; "
        f"`{MARKER}` = the interval excludes 0. Negative Δ loss = lower loss than the reference. A seed with a "
        "result on one side only is left out and counted as unpaired; a diverged run is paired, at l0.", "",
        "| variant | optimizer | pairs | Δ final val loss | Δ best val loss |",
        "|---|---|---|---|---|"]
    for c in comparisons:
        g = c.group
        if c.is_reference:
            lines.append(f"| {g.variant} | {g.optimizer} | reference | | |")
        elif c.reference is None:
            lines.append(f"| {g.variant} | {g.optimizer} | no `{reference}` / {g.optimizer} runs | – | – |")
        else:
            lines.append(f"| {g.variant} | {g.optimizer} | {_fmt_pairs(c.final_val_loss)} "
                         f"| {_fmt_difference(c.final_val_loss, '+.4f')} "
                         f"| {_fmt_difference(c.best_val_loss, '+.4f')} |")

    if any(g.has_lr_grid for g in groups):
        lines += [
            "", "## LR grid: max stable LR and LR sensitivity", "",
            "Per seed over the whole LR grid, then over seeds. LR sens. = Wortsman et al. 2023 "
            "E_lr[min(l, l0) − min_lr l] with l0 = the loss at initialisation (the run's first training loss; "
            "ln(vocab) if not recorded) and a diverged run = l0: mean ± sd. Max stable LR = largest LR with no "
            "divergence and final loss < l0"
            + (f" that kept more than {stable_fraction:g} of the best LR's improvement l0 − min_lr l"
               if stable_fraction else "")
            + ": geometric mean ×/÷ geometric sd (the grid is "
            f"log-spaced). Against `{reference}` (same optimizer, paired by seed): the ratio of max stable LRs "
            "(t-interval on the paired ln ratios, `*` = excludes 1) and Δ LR sens. (t-interval, `*` = excludes 0), "
            "both 95%. n = seeds with a result at every LR of the grid.", "",
            "| variant | optimizer | n | max stable LR | LR sens. | max stable LR ÷ reference | Δ LR sens. |",
            "|---|---|---|---|---|---|---|"]
        notes = []
        for c in comparisons:
            g = c.group
            if not g.has_lr_grid:
                continue
            if c.is_reference:
                vs = "reference | reference"
            elif c.reference is None:
                vs = "– | –"
            else:
                vs = f"{_fmt_difference(c.max_stable_lr_log, '', ratio=True)} | " \
                     f"{_fmt_difference(c.lr_sensitivity, '+.4f')}"
                if c.lr_sensitivity is not None and c.lr_sensitivity.unpaired:
                    notes.append(f"{g.variant} / {g.optimizer}: {c.lr_sensitivity.n} seed pairs, "
                                 f"{c.lr_sensitivity.unpaired} unpaired seeds left out of Δ LR sens.")
            lines.append(f"| {g.variant} | {g.optimizer} | {len(g.lr_sensitivity_by_seed)} "
                         f"| {_fmt_geometric(g.max_stable_lr_log)} | {_fmt_spread(g.lr_sensitivity, '.4f')} | {vs} |")
            if g.incomplete_seeds:
                notes.append(f"{g.variant} / {g.optimizer}: seed(s) {_seed_list(g.incomplete_seeds)} lack a result "
                             "at some LR of the grid and are left out of the LR statistics.")
            if g.no_stable_lr_seeds:
                notes.append(f"{g.variant} / {g.optimizer}: seed(s) {_seed_list(g.no_stable_lr_seeds)} have no "
                             "stable LR and are left out of the max stable LR.")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]

    if specs:
        lines += metrics_markdown(comparisons, reference, specs)

    failed = [r for r in rows if r.status not in DONE]
    if failed:
        lines += ["", "## Runs without a result", ""]
        lines += [f"- `{r.key}`: {r.status}" + (f": {r.error.splitlines()[0][:300]}" if r.error else "")
                  for r in sorted(failed, key=lambda r: r.key)]
    return "\n".join(lines) + "\n"


def _fmt_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _fmt_metric(values: dict[int, float], log: bool) -> str:
    """mean ± sd (linear) or geometric mean ×/÷ geometric sd factor (log) over the seeds' values."""
    if log:
        positive = [v for v in values.values() if v > 0]
        return _fmt_geometric(spread(math.log(v) for v in positive)) if positive else "–"
    s = spread(values.values())
    if s.n == 0:
        return "–"
    return _fmt_value(s.mean) if s.sd is None else f"{s.mean:.4g} ± {s.sd:.2g}"


def describe_metric(spec: MetricSpec) -> str:
    """'spectrum/gmcn, mean over steps' and the like, for the report."""
    how = f"first step with value ≤ {spec.threshold:g}" if spec.reduce == "first_step_at_or_below" else spec.reduce
    where = f" at lr={spec.lr:g}" if spec.lr is not None else ""
    after = f", from step {spec.after_step}" if spec.after_step else ""
    return f"`{spec.key}`, {how}{after}{where}" + (f" ({spec.description})" if spec.description else "")


def metrics_markdown(comparisons: list[Comparison], reference: str, specs: dict[str, MetricSpec]) -> list[str]:
    """One table per metric of the ablation: per variant x optimizer the value over seeds and, against the
    reference variant, the paired difference (linear) or ratio (log scale) with its 95% t-interval."""
    lines = ["", "## Metrics", "",
             "Each run's metric history reduced to one number (as described under each metric), read at the row's "
             "LR unless the metric names one; then over seeds: mean ± sd, or for log-scale metrics the geometric "
             f"mean ×/÷ geometric sd. Against `{reference}` (same optimizer, paired by seed): Δ with its 95% "
             "t-interval, or for log-scale metrics the ratio (interval on the paired ln ratios); `*` = the interval "
             "excludes 0 (ratios: 1). n = seeds with a value; a seed without one (e.g. a threshold never reached) "
             "is listed."]
    for name, spec in specs.items():
        log = spec.scale == "log"
        lines += ["", f"### `{name}`: {describe_metric(spec)}", "",
                  f"| variant | optimizer | n | {'value (geometric)' if log else 'value'} | "
                  f"{'÷ reference' if log else 'Δ vs reference'} | no value |",
                  "|---|---|---|---|---|---|"]
        for c in comparisons:
            g = c.group
            values = g.metrics_by_seed.get(name, {})
            if c.is_reference:
                vs = "reference"
            elif c.reference is None:
                vs = "–"
            else:
                vs = _fmt_difference(c.metrics.get(name), "+.4g", ratio=log)
            missing = g.metrics_missing.get(name, [])
            lines.append(f"| {g.variant} | {g.optimizer} | {len(values)} | {_fmt_metric(values, log)} | {vs} "
                         f"| {'seed(s) ' + _seed_list(missing) if missing else ''} |")
    return lines


def write_runs_csv(path: Path, rows: list[RunRow]) -> None:
    """One line per run; the ablation's metrics as columns ``metric.<name>``."""
    def flat(r: RunRow) -> dict:
        d = asdict(r)
        extra = d.pop("metrics")
        return {**d, **{f"metric.{k}": v for k, v in extra.items()}}

    names = sorted({k for r in rows for k in r.metrics})
    fields = [f for f in (list(asdict(rows[0]).keys()) if rows else ["key"]) if f != "metrics"]
    fields += [f"metric.{k}" for k in names]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow(flat(r))


def _label(g: GroupSummary) -> str:
    return f"{g.variant} / {g.optimizer}"


def _style(g: GroupSummary, groups: list[GroupSummary]) -> dict:
    """One colour per variant, one line style per optimizer."""
    variants = list(dict.fromkeys(x.variant for x in groups))
    optimizers = list(dict.fromkeys(x.optimizer for x in groups))
    return {"color": f"C{variants.index(g.variant) % 10}",
            "linestyle": ["-", "--", ":", "-."][optimizers.index(g.optimizer) % 4]}


def _finish(plt, fig, ax, path: Path) -> None:
    """Grid, legend and PNG for the one-axis plots."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(path: Path, mlflow_client, groups: list[GroupSummary], rows: list[RunRow]) -> None:
    """Validation loss vs optimizer step at each variant x optimizer's row LR: the mean over seeds, with a
    min-max band over the seeds when there are several."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        picked = [r for r in rows if (r.variant, r.optimizer) == (g.variant, g.optimizer) and r.status in DONE
                  and (g.lr is None or r.lr == g.lr)]
        if not picked:
            continue
        band = seed_band({m.step: m.value for m in mlflow_client.get_metric_history(r.run_id, "val/loss")}
                         for r in picked)
        style = _style(g, groups)
        ax.plot(band.steps, band.mean, **style, marker="o", markersize=3, label=f"{_label(g)} (n={len(picked)})")
        if len(picked) > 1:
            ax.fill_between(band.steps, band.low, band.high, color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss per variant (mean over seeds, band = min-max)")
    _finish(plt, fig, ax, path)


def plot_lr_sensitivity(path: Path, groups: list[GroupSummary], initial_loss: float | None) -> None:
    """Final val loss vs learning rate: mean over seeds with ± sd error bars (a diverged run counts as l0; a
    cross marks an LR where at least one seed diverged). Each variant's points are shifted by a few percent of
    the LR so that the error bars of different variants do not hide each other."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(groups):
        lrs = sorted(lr for lr, s in g.losses_by_lr.items() if s.n)
        if not lrs:
            continue
        shift = 10 ** (0.02 * (i - (len(groups) - 1) / 2))
        xs = [lr * shift for lr in lrs]
        ys = [g.losses_by_lr[lr].mean for lr in lrs]
        errors = [g.losses_by_lr[lr].sd or 0.0 for lr in lrs]
        style = _style(g, groups)
        ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=4, capsize=3, **style, label=_label(g))
        crossed = [(x, y) for x, y, lr in zip(xs, ys, lrs) if g.diverged_by_lr.get(lr)]
        ax.scatter([x for x, _ in crossed], [y for _, y in crossed], marker="x", color=style["color"], s=80,
                   zorder=3)
    if initial_loss is not None:
        ax.axhline(initial_loss, color="gray", linestyle="--", linewidth=1, label="l0 (loss at init)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (mean ± sd over seeds)")
    ax.set_title("LR sensitivity (diverged run = l0; x = a seed diverged)")
    _finish(plt, fig, ax, path)


def plot_spectra(path: Path, mlflow_client, groups: list[GroupSummary], rows: list[RunRow], keys: list[str]) -> None:
    """Histories of the recorded ``spectrum/*`` metrics (singular values, condition numbers), first 12 keys."""
    plt = _plt()
    keys = keys[:12]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for g in groups:
        picked = [r for r in rows if (r.variant, r.optimizer) == (g.variant, g.optimizer) and r.status in DONE
                  and (g.lr is None or r.lr == g.lr)]
        if not picked:
            continue
        run = min(picked, key=lambda r: r.seed)
        for ax, key in zip(axes.flat, keys):
            history = sorted(mlflow_client.get_metric_history(run.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], **_style(g, groups), label=_label(g))
    for ax, key in zip(axes.flat, keys):
        ax.set_title(key, fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metrics(path: Path, groups: list[GroupSummary], specs: dict[str, MetricSpec]) -> None:
    """One panel per metric of the ablation: every seed's value as a dot, the mean (geometric for log-scale
    metrics) as a bar, per variant x optimizer, so the seed spread is visible."""
    plt = _plt()
    names = list(specs)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.6 * nrows), squeeze=False)
    labels = [_label(g) for g in groups]
    for ax, name in zip(axes.flat, names):
        log = specs[name].scale == "log"
        for i, g in enumerate(groups):
            values = [v for v in g.metrics_by_seed.get(name, {}).values() if not log or v > 0]
            if not values:
                continue
            color = _style(g, groups)["color"]
            centre = math.exp(mean(math.log(v) for v in values)) if log else mean(values)
            ax.bar(i, centre, color=color, alpha=0.35, width=0.6)
            ax.scatter([i] * len(values), values, color=color, s=14, zorder=3)
        ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=6)
        ax.set_title(f"{name} (dots = seeds)", fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class AblationReport:
    """Everything an ablation's report is made of, read back from MLflow."""

    name: str
    rows: list[RunRow]
    groups: list[GroupSummary]
    reference: str | None
    specs: dict[str, MetricSpec]
    children: list
    stable_fraction: float = 0.0

    @property
    def comparisons(self) -> list[Comparison]:
        return compare_all(self.groups, self.reference, self.specs)

    def group(self, variant: str, optimizer: str) -> GroupSummary | None:
        return next((g for g in self.groups if (g.variant, g.optimizer) == (variant, optimizer)), None)


def metric_specs(parent) -> dict[str, MetricSpec]:
    """The ablation's metrics: section, as stored on its parent run (tag ``pcl.metrics``)."""
    from pc_lightning.config import build

    stored = json.loads(parent.data.tags.get("pcl.metrics", "{}") or "{}")
    return {name: build(MetricSpec, spec, f"metrics.{name}") for name, spec in stored.items()}


def eval_specs(children, declared: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
    """A metric per downstream-evaluation score the runs logged in the loop (``eval/<task>/<metric>``,
    ``monitor.eval_tasks``; not their stderrs or timings), read at the last evaluation: an ablation's summary shows
    them without a ``metrics:`` section. One the file declares itself is left as declared."""
    keys = sorted({k for r in children for k in r.data.metrics
                   if k.startswith("eval/") and k.count("/") >= 2 and not k.endswith("_stderr")})
    taken = {spec.key for spec in declared.values()} | set(declared)
    return {k: MetricSpec(key=k, reduce="last", description="downstream evaluation in the loop, last value")
            for k in keys if k not in taken}


def ablation_report(mlflow_client, parent) -> AblationReport:
    """Rows, groups and statistics of an ablation parent run."""
    name = parent.data.tags["pcl.name"]
    specs = metric_specs(parent)
    # the grid's runs (a shared warm-start run, pcl.key warm_start, is not one of them)
    children = [r for r in runs.children(mlflow_client, parent) if r.data.tags.get("pcl.key") != "warm_start"]
    specs.update(eval_specs(children, specs))
    rows = select_runs([run_row(mlflow_client, r, specs) for r in children])
    variants = json.loads(parent.data.tags.get("pcl.variants", "[]")) or sorted({r.variant for r in rows})
    optimizers = json.loads(parent.data.tags.get("pcl.optimizers", "[]")) or sorted({r.optimizer for r in rows})
    rows.sort(key=lambda r: (variants.index(r.variant) if r.variant in variants else len(variants),
                             optimizers.index(r.optimizer) if r.optimizer in optimizers else len(optimizers),
                             r.lr, r.seed))
    fraction = float(parent.data.tags.get("pcl.stable_fraction") or 0.0)
    groups = [summarize(v, o, [r for r in rows if (r.variant, r.optimizer) == (v, o)], specs, fraction)
              for v in variants for o in optimizers if any((r.variant, r.optimizer) == (v, o) for r in rows)]
    reference = parent.data.tags.get("pcl.reference") or (variants[0] if variants else None)
    return AblationReport(name, rows, groups, reference, specs, children, fraction)


def render_ablation(mlflow_client, parent, out_dir: Path) -> Path:
    """Write summary.md, runs.csv and the PNG plots for an ablation parent run into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = ablation_report(mlflow_client, parent)
    groups, rows = rep.groups, rep.rows
    (out_dir / "summary.md").write_text(summary_markdown(rep.name, groups, rows, rep.reference, rep.specs,
                                                         rep.stable_fraction))
    write_runs_csv(out_dir / "runs.csv", rows)
    plot_loss_curves(out_dir / "loss_curves.png", mlflow_client, groups, rows)
    if any(g.has_lr_grid for g in groups):
        l0 = next((r.initial_loss for r in rows if r.initial_loss), None)
        plot_lr_sensitivity(out_dir / "lr_sensitivity.png", groups, l0)
    spectrum_keys = sorted({k for r in rep.children for k in r.data.metrics if k.startswith("spectrum/")})
    if spectrum_keys:
        plot_spectra(out_dir / "spectrum.png", mlflow_client, groups, rows, spectrum_keys)
    if rep.specs:
        plot_metrics(out_dir / "metrics.png", groups, rep.specs)
    return out_dir


def ablation_dir(name: str, output: str | None = None) -> Path:
    """results/<output or name>/ (an ablation file's ``output:`` names another folder under results/)."""
    return tracking.RESULTS_DIR / (output or name)


def parent_dir(parent) -> Path:
    return ablation_dir(parent.data.tags["pcl.name"], parent.data.tags.get("pcl.output") or None)


def publish_ablation(mlflow_client, parent_id: str) -> Path:
    """Render results/<name>/ and attach it to the parent run as artifacts."""
    parent = mlflow_client.get_run(parent_id)
    out_dir = render_ablation(mlflow_client, parent, parent_dir(parent))
    mlflow_client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    return out_dir


# --------------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------------


def study_dir(name: str) -> Path:
    return tracking.RESULTS_DIR / "sweeps" / name


def render_study(study, mlflow_client, parent, out_dir: Path) -> Path:
    """Write summary.md, trials.csv, best_params.json and Optuna's history/slice plots into out_dir."""
    import optuna
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    run_of_trial = {r.data.tags.get("pcl.trial"): r for r in runs.children(mlflow_client, parent)
                    if RunStatus.of(r) != RunStatus.CRASHED}
    param_names = sorted({p for t in trials for p in t.params})
    rows = []
    for t in trials:
        run = run_of_trial.get(str(t.number))
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "diverged": bool(t.user_attrs.get("diverged", False)),
                     "last_step": t.last_step, **{p: t.params.get(p) for p in param_names},
                     "mlflow_run_id": run.info.run_id if run else "",
                     "tokens_per_sec": run.data.metrics.get("perf/tokens_per_sec") if run else None})
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    metric = parent.data.tags.get("pcl.metric", "objective")
    lines = [f"# Study `{study.study_name}`", "",
             f"Direction: {study.direction.name.lower()}; trials: "
             + ", ".join(f"{n} {k.lower()}" for k, n in counts.items()) + ".", ""]
    best = None
    if complete:
        best = study.best_trial
        lines += [f"Best trial {best.number}: {metric} = {best.value:.4f}", "",
                  *[f"- `{k}` = {v!r}" for k, v in best.params.items()], ""]
    header = ["trial", "state", "value", "diverged", *param_names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        params = [format(r[p], ".4g") if isinstance(r[p], float) else str(r[p]) for p in param_names]
        lines.append("| " + " | ".join([str(r["number"]), r["state"], value, "yes" if r["diverged"] else "no",
                                        *params]) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "best_params.json").write_text(json.dumps(
        {"number": best.number, "value": best.value, "params": best.params} if best else {}, indent=2))

    if complete:
        import warnings

        plt = _plt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for filename, plot in (("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history),
                                   ("slice.png", optuna.visualization.matplotlib.plot_slice)):
                axes = plot(study)
                fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                fig.tight_layout()
                fig.savefig(out_dir / filename, dpi=110)
                plt.close(fig)
    return out_dir


def publish_study(study, mlflow_client, parent_id: str) -> Path:
    """Render results/sweeps/<name>/ and attach it, and the best trial, to the study's parent run."""
    parent = mlflow_client.get_run(parent_id)
    out_dir = render_study(study, mlflow_client, parent, study_dir(study.study_name))
    mlflow_client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    best = json.loads((out_dir / "best_params.json").read_text())
    if best:
        mlflow_client.log_metric(parent_id, "best_value", best["value"])
        mlflow_client.set_tag(parent_id, "best_trial", str(best["number"]))
        for k, v in best["params"].items():
            mlflow_client.set_tag(parent_id, f"best.{k}", str(v))
    return out_dir


# --------------------------------------------------------------------------------------------------
# pcl report
# --------------------------------------------------------------------------------------------------


def report(name_or_spec: str, tracking_uri: str | None = None, storage: str | None = None) -> int:
    """Re-render an ablation's or study's results from MLflow (and the study's Optuna storage) alone. The
    storage is the study's ``pcl.storage`` tag unless given; the tag's password is redacted, so without
    ``storage`` the database's password comes from ``PGPASSWORD`` or ``~/.pgpass``."""
    path = Path(name_or_spec)
    kinds = ["ablation", "study"]
    name = name_or_spec
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        kinds = ["study"] if "study_name" in data else ["ablation"]
        name = data.get("study_name") or data.get("name") or name
    tracking.check_server(TrackingConfig(tracking_uri=tracking_uri))  # down or refusing us: one line, in seconds
    uri = tracking.tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    mlflow_client = tracking.client(uri)
    for kind in kinds:
        parent = runs.find_parent(mlflow_client, kind, name)
        if parent is not None:
            break
    else:
        raise ConfigError("name", f"no ablation or study named '{name}' in {uri}")
    if kind == "ablation":
        out_dir = render_ablation(mlflow_client, parent, parent_dir(parent))
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = storage or without_masked_password(parent.data.tags["pcl.storage"])
        if is_journal(storage):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            storage = JournalStorage(JournalFileBackend(storage))
        out_dir = render_study(optuna.load_study(study_name=name, storage=storage), mlflow_client, parent,
                               study_dir(name))
    print(f"{kind} '{name}': report written to {out_dir}")
    return 0
