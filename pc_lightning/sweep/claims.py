"""``pcl claims``: positive controls. Each claim is an ablation file with a ``claim:`` section, and its verdict is
computed from the ablation's seed statistics by a rule written in that file.

A claim file (``conf/ablation/claims/<claim>.yaml``) is an ordinary ablation file (:mod:`pc_lightning.sweep.ablation`,
usually with a ``metrics:`` section) plus::

    claim:
      title: PC lowers the condition number and the loss
      paper: "Wang et al.: with AdamW (level 4) and Muon (level 2), PC ... a clear advantage at 1B."
      note: what differs from the paper at this size (optional)
      checks:
        - name: PC lowers the final loss with AdamW
          measure: final_val_loss        # a loss column, lr_sensitivity, max_stable_lr, or a metrics: name
          variant: pc
          optimizer: adamw               # default: the ablation's first optimizer
          against: baseline              # default: the reference variant
          against_optimizer: adamw       # default: the same optimizer
          expect: below                  # variant - against below (or above) the margin
          margin: 0.0                    # linear measures: a difference; log-scale ones: a ratio (default 1)

**The rule of a check.** Take the paired differences d_s = x_s(variant) − x_s(against) over the seeds s both have
(ln x for log-scale measures: max stable LR and metrics with ``scale: log``), and their 95% Student t-interval
[lo, hi] (:mod:`pc_lightning.sweep.statistics`). With threshold m (the margin; ln of it for log-scale measures),
``expect: below`` *passes* when hi < m, *fails* when lo >= m (the interval lies on the other side), and is *open*
otherwise, or with fewer than two pairs. ``expect: above`` is the mirror image (passes when lo > m, fails when
hi <= m).

**The verdict of a claim**: *reproduced* when every check passes; *not reproduced* when any check fails;
*inconclusive at this size* otherwise. The sentence after it names the check that decided.

``pcl claims [NAME ...]`` runs each named claim's ablation (all of ``conf/ablation/claims/`` by default; finished
runs are kept, so the command resumes), renders each to ``results/claims/<claim>/`` and writes
``results/claims/summary.md`` with a section per claim (the paper's claim, the measured differences with their
intervals, the verdict and why, the runs' wall time) for every claim that has runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pc_lightning import tracking
from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.sweep.statistics import PairedDifference

CLAIMS_DIR = Path(__file__).resolve().parents[2] / "conf" / "ablation" / "claims"
SUMMARY = Path("claims") / "summary.md"  # under the results directory

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this size"


@dataclass
class CheckSpec:
    name: str
    measure: str
    variant: str
    expect: Literal["below", "above"]
    optimizer: Optional[str] = None
    against: Optional[str] = None
    against_optimizer: Optional[str] = None
    margin: Optional[float] = None  # None: 0 (a difference) or 1 (a ratio, for log-scale measures)


@dataclass
class ClaimSpec:
    title: str
    paper: str
    checks: list[CheckSpec]
    note: str = ""


def check_claim(claim: ClaimSpec, variants: list[str], optimizers: list[str], metric_names: list[str]) -> None:
    """ConfigError naming the key when a check names a variant, optimizer or measure the ablation does not have."""
    from pc_lightning.sweep.report import LOSS_MEASURES

    if not claim.checks:
        raise ConfigError("claim.checks", "a claim needs at least one check")
    for i, c in enumerate(claim.checks):
        key = f"claim.checks[{i}]"
        for field_name in ("variant", "against"):
            value = getattr(c, field_name)
            if value is not None and value not in variants:
                raise ConfigError(f"{key}.{field_name}", f"'{value}' is not a variant of this ablation ({variants})")
        for field_name in ("optimizer", "against_optimizer"):
            value = getattr(c, field_name)
            if value is not None and value not in optimizers:
                raise ConfigError(f"{key}.{field_name}", f"'{value}' is not an optimizer of this ablation ({optimizers})")
        if c.measure not in LOSS_MEASURES and c.measure not in metric_names:
            raise ConfigError(f"{key}.measure", f"'{c.measure}' is neither one of {list(LOSS_MEASURES)} nor a "
                                                f"metric of this file's metrics: ({metric_names})")


@dataclass
class CheckResult:
    check: CheckSpec
    variant: tuple[str, str]  # (variant, optimizer)
    against: tuple[str, str]
    log: bool
    difference: PairedDifference | None  # None: one side has no runs
    outcome: Literal["pass", "fail", "open"]

    @property
    def threshold(self) -> float:
        """The margin on the scale of the difference (ln of the ratio for log-scale measures)."""
        margin = self.check.margin if self.check.margin is not None else (1.0 if self.log else 0.0)
        return math.log(margin) if self.log else margin

    def shown(self, value: float) -> str:
        return f"{math.exp(value):.3g}×" if self.log else f"{value:+.4g}"

    def measured(self) -> str:
        """'-0.051 [-0.08, -0.02] (n=3)' or '1.5× [1.1×, 2×] (n=3)'."""
        d = self.difference
        if d is None or d.n == 0:
            return "no paired runs"
        if not d.has_interval:
            return f"{self.shown(d.mean)} (n={d.n}: no interval)"
        return f"{self.shown(d.mean)} [{self.shown(d.low)}, {self.shown(d.high)}] (n={d.n})"

    def rule(self) -> str:
        what = "ratio" if self.log else "Δ"
        side = "<" if self.check.expect == "below" else ">"
        return f"{what} {self.check.measure} ({self.variant[0]}/{self.variant[1]} vs {self.against[0]}/" \
               f"{self.against[1]}): 95% interval {side} {self.shown(self.threshold) if self.log else f'{self.threshold:g}'}"

    def reason(self) -> str:
        d = self.difference
        if d is None or d.n == 0:
            return f"{self.check.name}: no paired runs"
        if not d.has_interval:
            return f"{self.check.name}: only {d.n} paired seed(s), no interval"
        bound = self.shown(self.threshold) if self.log else f"{self.threshold:g}"
        if self.outcome == "pass":
            return f"{self.check.name}: {self.measured()} lies {self.check.expect} {bound}"
        if self.outcome == "fail":
            other = "above" if self.check.expect == "below" else "below"
            return f"{self.check.name}: {self.measured()} lies {other} {bound} (or at it)"
        return f"{self.check.name}: {self.measured()} includes {bound}"


def decide(d: PairedDifference | None, expect: str, threshold: float) -> Literal["pass", "fail", "open"]:
    """The outcome of one check from its paired interval (see the module docstring)."""
    if d is None or not d.has_interval:
        return "open"
    if expect == "below":
        return "pass" if d.high < threshold else "fail" if d.low >= threshold else "open"
    return "pass" if d.low > threshold else "fail" if d.high <= threshold else "open"


@dataclass
class Verdict:
    claim: ClaimSpec
    results: list[CheckResult]

    @property
    def verdict(self) -> str:
        outcomes = [r.outcome for r in self.results]
        if outcomes and all(o == "pass" for o in outcomes):
            return REPRODUCED
        if any(o == "fail" for o in outcomes):
            return NOT_REPRODUCED
        return INCONCLUSIVE

    @property
    def why(self) -> str:
        """One sentence: the deciding check(s)."""
        v = self.verdict
        if v == REPRODUCED:
            return "every check's 95% interval lies on the claimed side (" + "; ".join(
                r.reason() for r in self.results) + ")."
        deciding = [r for r in self.results if r.outcome == ("fail" if v == NOT_REPRODUCED else "open")]
        return "; ".join(r.reason() for r in deciding) + "."


def evaluate(claim: ClaimSpec, report, optimizers: list[str]) -> Verdict:
    """The claim's checks on an :class:`~pc_lightning.sweep.report.AblationReport`."""
    from pc_lightning.sweep.report import is_log_scale, paired_measure

    results = []
    for c in claim.checks:
        opt = c.optimizer or optimizers[0]
        a = (c.variant, opt)
        b = (c.against or report.reference, c.against_optimizer or opt)
        log = is_log_scale(c.measure, report.specs)
        ga, gb = report.group(*a), report.group(*b)
        d = None
        if ga is not None and gb is not None:
            try:
                d = paired_measure(ga, gb, c.measure, log)
            except KeyError:
                d = None
        result = CheckResult(c, a, b, log, d, "open")
        result.outcome = decide(d, c.expect, result.threshold)
        results.append(result)
    return Verdict(claim, results)


# --------------------------------------------------------------------------------------------------
# results/claims/summary.md
# --------------------------------------------------------------------------------------------------


def claim_files(names: list[str] | None = None, directory: Path = CLAIMS_DIR) -> list[Path]:
    """The claim files to run: the named ones (file stems under ``directory``), or all of them."""
    available = sorted(directory.glob("*.yaml"))
    if not names:
        return available
    by_name = {p.stem: p for p in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError("claims", f"unknown claim(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


@dataclass
class ClaimOutcome:
    name: str  # the file stem
    spec: object  # AblationSpec
    verdict: Verdict | None  # None: no runs yet
    runs: int = 0
    wall_seconds: float = 0.0
    seeds: list[int] = field(default_factory=list)


def run_seconds(run) -> float:
    """A run's duration from MLflow's start and end times (0 while it has no end)."""
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000.0 if start and end else 0.0


def outcome_of(mlflow_client, path: Path) -> ClaimOutcome:
    from pc_lightning.sweep import runs
    from pc_lightning.sweep.ablation import load_ablation
    from pc_lightning.sweep.report import DONE, ablation_report

    spec = load_ablation(path)
    parent = runs.find_parent(mlflow_client, "ablation", spec.name)
    if parent is None:
        return ClaimOutcome(path.stem, spec, None)
    rep = ablation_report(mlflow_client, parent)
    chosen = {r.run_id for r in rep.rows if r.status in DONE}
    if not chosen:  # started but no run finished or diverged yet (e.g. interrupted in its first run)
        return ClaimOutcome(path.stem, spec, None)
    wall = sum(run_seconds(r) for r in rep.children if r.info.run_id in chosen)
    wall += sum(run_seconds(r) for r in runs.children(mlflow_client, parent)  # a shared warm start, if any
                if r.data.tags.get("pcl.key") == "warm_start" and r.data.tags.get("pcl.checkpoint"))
    return ClaimOutcome(path.stem, spec, evaluate(spec.claim, rep, list(spec.optimizers)), len(chosen), wall,
                        sorted({r.seed for r in rep.rows}))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def summary_markdown(outcomes: list[ClaimOutcome]) -> str:
    lines = ["# Claims: positive controls", "",
             "Each claim is an ablation under `conf/ablation/claims/` run with several seeds; its verdict is computed "
             "from the paired 95% t-intervals by the rule stated in its file (`claim.checks`): *reproduced* when "
             "every check's interval lies on the claimed side of its margin, *not reproduced* when one lies on the "
             "other side, *inconclusive at this size* otherwise. Re-run with `pcl claims [NAME ...]`; each claim's "
             "full report (tables, runs.csv, plots with the seed spread) is in `claims/<name>/`. Wall time: the sum "
             "of the runs' durations on the machine that ran them.", "",
             "| claim | verdict | why | runs | wall time |", "|---|---|---|---|---|"]
    for o in outcomes:
        if o.verdict is None:
            lines.append(f"| [{o.name}](#{o.name}) | not run | – | 0 | – |")
            continue
        lines.append(f"| [{o.name}](#{o.name}) | *{o.verdict.verdict}* | {o.verdict.why} | {o.runs} "
                     f"| {_minutes(o.wall_seconds)} |")
    for o in outcomes:
        claim = o.spec.claim
        lines += ["", f'<a id="{o.name}"></a>', f"## {o.name}: {claim.title}", "",
                  f"**The paper's claim.** {claim.paper.strip()}", ""]
        if claim.note:
            lines += [f"**At this size.** {claim.note.strip()}", ""]
        lines += [f"Ablation `{o.spec.name}` (`conf/ablation/claims/{o.name}.yaml`), seeds "
                  f"{', '.join(str(s) for s in (o.seeds or o.spec.seeds))}; report in "
                  f"[`{o.name}/summary.md`]({o.name}/summary.md).", ""]
        if o.verdict is None:
            lines += ["Not run yet: `pcl claims " + o.name + "`."]
            continue
        lines += ["| check | measured: mean [95% interval] | rule | outcome |", "|---|---|---|---|"]
        for r in o.verdict.results:
            lines.append(f"| {r.check.name} | {r.measured()} | {r.rule()} | {r.outcome} |")
        lines += ["", f"**Verdict: {o.verdict.verdict}.** {o.verdict.why[0].upper()}{o.verdict.why[1:]}", "",
                  f"{o.runs} runs, {_minutes(o.wall_seconds)} of training wall time."]
    return "\n".join(lines) + "\n"


def write_summary(mlflow_client, files: list[Path]) -> Path:
    out = tracking.RESULTS_DIR / SUMMARY
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary_markdown([outcome_of(mlflow_client, p) for p in files]))
    return out


def run_claims(names: list[str] | None = None, overrides: list[str] | None = None, seeds: list[int] | None = None,
               run: bool = True, directory: Path = CLAIMS_DIR, workers: int = 1) -> int:
    """Run the named claims (all by default), ``workers`` runs at a time, then write results/claims/summary.md over
    every claim file."""
    from pc_lightning.sweep.ablation import run_ablation

    files = claim_files(names, directory)
    code = 0
    if run:
        for path in files:
            print(f"claim '{path.stem}': {path}")
            code = max(code, run_ablation(str(path), overrides, workers=workers, seeds=seeds))
            if code == 130:
                return code
    mlflow_client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    out = write_summary(mlflow_client, claim_files(None, directory))
    for o in [outcome_of(mlflow_client, p) for p in files]:
        verdict = o.verdict.verdict if o.verdict else "not run"
        print(f"claim '{o.name}': {verdict}", file=sys.stdout)
    print(f"claims: summary in {out}")
    return code
