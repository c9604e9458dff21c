"""``pcl ablate``: run a declared grid of variants x optimizers x learning rates x seeds, then report.

An ablation file (``conf/ablation/*.yaml``)::

    name: quick
    base: conf/baseline.yaml          # experiment config every run starts from
    overrides: [trainer.max_steps=150] # budget etc., applied to every run
    variants:  {baseline: [], qk_norm: [variant/qk_norm], softcap: [model.attn_softcap=50.0]}
    optimizers: {adamw: [], muon: [optim/muon]}

Each list holds ``key.path=value`` overrides or preset names under ``conf/`` (see
:func:`pc_lightning.sweep.space.compose_config`), applied in the order overrides, variant, optimizer, lr,
seed, command-line overrides.
    seeds: [1337]
    lrs: [3.0e-3]                      # empty = the config's optim.lr
    reference: baseline                # the variant the others are compared with; default: the first one
    warm_start: [trainer.max_steps=300, trainer.checkpoint_every=300]  # optional: one shared start (below)

With ``warm_start`` one run (base, overrides, then these; seed = the first seed) is trained first as a child of
the parent (key ``warm_start``) and its ``last.ckpt`` becomes ``trainer.init_from`` of every combination, so they
all start from the same weights (Abreu et al.'s optimizer comparison). It must write a checkpoint at its last
step (``trainer.checkpoint_every`` dividing its ``max_steps``). A re-run reuses it.

Every combination is one :func:`pc_lightning.train.train` run nested under one MLflow parent run per
ablation, tagged with its key ``variant|optimizer|lr|seed``. Re-running the command skips combinations
that already have a finished or diverged run under that parent and retries failed or killed ones. A
combination that fails (e.g. a variant whose code is not there yet) ends as a failed run carrying the error
(its run is created before anything else, :func:`pc_lightning.train.open_run`) and the grid goes on. At the
end ``results/<name>/`` (summary.md, runs.csv, PNG plots) is rendered from MLflow by
:mod:`pc_lightning.sweep.report` -- the same code ``pcl report`` uses -- and attached to the parent run.

``--workers N`` runs the combinations in N worker processes of ``cores // N`` threads each
(:mod:`pc_lightning.sweep.workers`) under the same parent run and with the same resume rules; the report is
rendered once, by this process, when they are done. A Ctrl-C stops every worker: their runs in progress end
killed, the parent run too, and the same command resumes. Progress (runs done / total, elapsed, ETA, the step
of each run in progress) is shown by :mod:`pc_lightning.progress`.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import yaml

from pc_lightning import tracking
from pc_lightning.config import ConfigError, ExperimentConfig, build
from pc_lightning.progress import Progress, StepProgress
from pc_lightning.secrets import redact
from pc_lightning.sweep import runs
from pc_lightning.sweep.claims import ClaimSpec, check_claim
from pc_lightning.sweep.run_metrics import MetricSpec
from pc_lightning.sweep.workers import available_cores, oversubscription_warning, run_jobs
from pc_lightning.sweep.space import compose_config, resolve_relative
from pc_lightning.tracked_run import RunStatus


@dataclass
class AblationSpec:
    name: str
    base: str
    variants: dict[str, list[str]]
    optimizers: dict[str, list[str]] = field(default_factory=lambda: {"adamw": []})
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1337])
    lrs: list[float] = field(default_factory=list)
    reference: str | None = None  # the variant the report compares the others with; None = the first variant
    # an LR counts as stable when its run did not diverge and kept more than this fraction of the best LR's
    # improvement over l0 (0 = ended below l0; pc_lightning/sweep/lr_sensitivity.py)
    stable_fraction: float = 0.0
    metrics: dict[str, MetricSpec] = field(default_factory=dict)  # extra per-run metrics the report summarises
    output: str | None = None  # the report's folder under results/ (None = the name)
    claim: ClaimSpec | None = None  # a positive control's claim and its rule (pcl claims)
    # overrides of one shared warm-start run trained before the grid (seed: the first seed); its last checkpoint
    # becomes every run's trainer.init_from (None: no warm start)
    warm_start: list[str] | None = None

    @property
    def reference_variant(self) -> str:
        return self.reference or next(iter(self.variants))


@dataclass(frozen=True)
class Combination:
    variant: str
    optimizer: str
    lr: float | None  # None = the config's optim.lr
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}|{self.optimizer}|lr={'config' if self.lr is None else f'{self.lr:g}'}|seed={self.seed}"

    @property
    def slug(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.variant}-{self.optimizer}{lr}-s{self.seed}"


def load_ablation(path: str | Path) -> AblationSpec:
    path = Path(path)
    if not path.exists():
        raise ConfigError("spec", f"ablation file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping")
    for required in ("name", "base", "variants"):
        if required not in data:
            raise ConfigError(required, f"missing in {path}")
    for section in ("variants", "optimizers"):  # `name:` with nothing after it means no overrides
        if isinstance(data.get(section), dict):
            data[section] = {k: v or [] for k, v in data[section].items()}
    spec: AblationSpec = build(AblationSpec, data)
    spec.base = str(resolve_relative(spec.base, path))
    if not spec.variants or not spec.optimizers or not spec.seeds:
        raise ConfigError("variants", "need at least one variant, one optimizer and one seed")
    if any(lr <= 0 for lr in spec.lrs):
        raise ConfigError("lrs", "learning rates must be positive")
    if spec.reference is not None and spec.reference not in spec.variants:
        raise ConfigError("reference", f"'{spec.reference}' is not a variant of this ablation "
                                       f"(variants: {list(spec.variants)})")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("seeds", f"a seed is listed twice: {spec.seeds}")
    if not 0 <= spec.stable_fraction < 1:
        raise ConfigError("stable_fraction", f"must be in [0, 1), got {spec.stable_fraction}")
    for name, metric in spec.metrics.items():
        metric.check(name)
    if spec.output is not None and (Path(spec.output).is_absolute() or ".." in Path(spec.output).parts):
        raise ConfigError("output", f"must be a folder under the results directory, got {spec.output!r}")
    if spec.claim is not None:
        check_claim(spec.claim, list(spec.variants), list(spec.optimizers), list(spec.metrics))
    return spec


def combinations(spec: AblationSpec) -> list[Combination]:
    lrs: list[float | None] = list(spec.lrs) or [None]
    return [Combination(v, o, lr, s) for v in spec.variants for o in spec.optimizers for lr in lrs for s in spec.seeds]


def run_config(spec: AblationSpec, combo: Combination, overrides: list[str], parent_id: str | None) -> ExperimentConfig:
    items = list(spec.overrides) + spec.variants[combo.variant] + spec.optimizers[combo.optimizer]
    if combo.lr is not None:
        items.append(f"optim.lr={combo.lr}")
    items += [f"trainer.seed={combo.seed}", *overrides]
    cfg = compose_config(spec.base, items)
    cfg.name = f"{spec.name}-{combo.slug}"
    cfg.tracking.run_name = combo.slug
    cfg.tracking.parent_run_id = parent_id
    cfg.tracking.tags.update({
        "pcl.kind": "ablation-run", "pcl.ablation": spec.name, "pcl.key": combo.key, "pcl.variant": combo.variant,
        "pcl.optimizer": combo.optimizer, "pcl.lr": "" if combo.lr is None else repr(combo.lr),
        "pcl.seed": str(combo.seed)})
    cfg.trainer.progress_bar = False
    return cfg


WARM_START_KEY = "warm_start"


def warm_start_config(spec: AblationSpec, overrides: list[str], parent_id: str | None) -> ExperimentConfig:
    cfg = compose_config(spec.base, list(spec.overrides) + list(spec.warm_start or [])
                         + [f"trainer.seed={spec.seeds[0]}", *overrides])
    cfg.name = f"{spec.name}-{WARM_START_KEY}"
    cfg.tracking.run_name = WARM_START_KEY
    cfg.tracking.parent_run_id = parent_id
    cfg.tracking.tags.update({"pcl.kind": "ablation-warm-start", "pcl.ablation": spec.name,
                              "pcl.key": WARM_START_KEY})
    cfg.trainer.progress_bar = False
    return cfg


def warm_start_checkpoint(spec: AblationSpec, overrides: list[str], mlflow_client, parent_id: str) -> str:
    """The shared warm start's ``last.ckpt``: the finished one under the parent, or trained now."""
    from pc_lightning.train import train

    for r in runs.children(mlflow_client, mlflow_client.get_run(parent_id)):
        path = r.data.tags.get("pcl.checkpoint")
        if r.data.tags.get("pcl.key") == WARM_START_KEY and is_done(r) and path and Path(path).exists():
            print(f"ablation '{spec.name}': warm start {path}")
            return path
    cfg = warm_start_config(spec, overrides, parent_id)
    started = time.time()
    result = train(cfg, quiet=True)
    path = Path(result.checkpoint_dir or "") / "last.ckpt"
    if result.status != RunStatus.FINISHED or not path.exists():
        raise ConfigError("warm_start", f"the warm-start run ended {result.status} without {path}: it must finish "
                                        "and write a checkpoint at its last step (trainer.checkpoint_every)")
    mlflow_client.set_tag(result.run_id, "pcl.checkpoint", str(path))
    print(f"ablation '{spec.name}': warm start trained in {time.time() - started:.0f}s, val/loss="
          f"{result.metrics.get('val/loss', float('nan')):.4f} -> {path}")
    return str(path)


def is_done(run) -> bool:
    """Finished and diverged runs are results; failed, killed and running ones are redone."""
    return RunStatus.of(run) in (RunStatus.FINISHED, RunStatus.DIVERGED)


@dataclass
class Outcome:
    """How one combination's run ended, as the progress display reports it."""

    status: RunStatus
    val_loss: float | None = None
    seconds: float = 0.0
    error: str = ""  # type and message of the exception that failed the run

    def describe(self) -> str:
        if self.status == RunStatus.FAILED:
            return f"FAILED: {self.error}"
        loss = "no validation" if self.val_loss is None or math.isnan(self.val_loss) else \
            f"val/loss={self.val_loss:.4f}"
        return f"{self.status}, {loss} ({self.seconds:.0f}s)"


def run_combination(spec: AblationSpec, combo: Combination, overrides: list[str], parent_id: str,
                    callbacks: list[L.Callback] = ()) -> Outcome:
    """Train one combination under the parent run. An exception fails only this combination (its run ended
    failed, carrying the error); a Ctrl-C is raised."""
    from pc_lightning.train import train

    started = time.monotonic()
    try:
        result = train(run_config(spec, combo, overrides, parent_id), extra_callbacks=list(callbacks), quiet=True)
    except Exception as e:  # one broken combination must not stop the grid
        return Outcome(RunStatus.FAILED, seconds=time.monotonic() - started, error=redact(f"{type(e).__name__}: {e}"))
    return Outcome(result.status, result.metrics.get("val/loss"), time.monotonic() - started)


def _combination_job(spec: AblationSpec, overrides: list[str], parent_id: str, callbacks: list[L.Callback],
                     combo: Combination, report_step) -> Outcome:
    """A worker process's job (:func:`pc_lightning.sweep.workers.run_jobs`): one combination."""
    return run_combination(spec, combo, overrides, parent_id, [StepProgress(report_step), *callbacks])


def run_ablation(spec_path: str, overrides: list[str] | None = None, workers: int = 1,
                 extra_callbacks: list[L.Callback] = (), seeds: list[int] | None = None) -> int:
    """Run every missing combination, ``workers`` at a time (each in a process of its own if ``workers`` > 1),
    then render results/<name>/. Exit code 1 if any run failed, 130 if interrupted. ``extra_callbacks`` join
    every run's Trainer (pickled into the worker processes). ``seeds`` replaces the file's seeds (e.g. a quick
    check with fewer)."""
    from pc_lightning.sweep.report import publish_ablation

    overrides = list(overrides or [])
    if workers < 1:
        raise ConfigError("--workers", "must be >= 1")
    spec = load_ablation(spec_path)
    if seeds:
        spec.seeds = list(seeds)
    grid = combinations(spec)
    threads = {run_config(spec, combo, overrides, None).trainer.num_threads  # every combination is a valid
               for combo in grid}                                            # config before anything runs
    if warning := oversubscription_warning(threads, workers, available_cores()):
        print(warning, file=sys.stderr)
    if spec.warm_start is not None:
        warm_start_config(spec, overrides, None)

    base = compose_config(spec.base, list(spec.overrides) + overrides)
    tracking.check_server(base.tracking)  # a tracking server that is down or refuses us: one line, in seconds
    uri = tracking.tracking_uri(base.tracking)
    mlflow_client = tracking.client(uri)
    parent = runs.find_or_create_parent(mlflow_client, uri, base.tracking.experiment, "ablation", spec.name, {
        "pcl.ablation": spec.name, "pcl.spec": str(Path(spec_path).resolve()),
        "pcl.variants": json.dumps(list(spec.variants)), "pcl.optimizers": json.dumps(list(spec.optimizers)),
        "pcl.reference": spec.reference_variant, "pcl.output": spec.output or "",
        "pcl.stable_fraction": repr(spec.stable_fraction),
        "pcl.metrics": json.dumps({name: asdict(m) for name, m in spec.metrics.items()})})
    failures = 0
    try:
        with parent:  # finished, or killed by Ctrl-C/SIGTERM (Lightning raises SIGTERMException), or failed
            done = {r.data.tags.get("pcl.key")
                    for r in runs.children(mlflow_client, mlflow_client.get_run(parent.run_id))
                    if is_done(r)}
            todo = [c for c in grid if c.key not in done]
            parallel = f" in {min(workers, len(todo))} worker processes" if workers > 1 and len(todo) > 1 else ""
            print(f"ablation '{spec.name}': {len(grid)} runs, {len(grid) - len(todo)} already done, "
                  f"{len(todo)} to run{parallel}", flush=True)
            run_overrides = list(overrides)
            if spec.warm_start is not None and todo:  # one shared start, trained once (before the grid)
                checkpoint = warm_start_checkpoint(spec, overrides, mlflow_client, parent.run_id)
                run_overrides = [f"trainer.init_from={checkpoint}", *overrides]
            with Progress(f"ablation '{spec.name}'", total=len(grid), done=len(grid) - len(todo)) as progress:
                def ended(combo: Combination, outcome: Outcome) -> None:
                    nonlocal failures
                    failures += outcome.status == RunStatus.FAILED
                    progress.finished(combo.key, outcome.describe(), error=outcome.status == RunStatus.FAILED)

                if parallel:
                    job = functools.partial(_combination_job, spec, run_overrides, parent.run_id, list(extra_callbacks))
                    try:
                        lost = run_jobs(job, todo, workers,
                                        on_step=lambda i, step, max_steps: progress.step(todo[i].key, step, max_steps),
                                        on_done=lambda i, outcome: ended(todo[i], outcome))
                    except (KeyboardInterrupt, SystemExit):  # every worker has exited: none closes a run any more
                        runs.close_orphaned_children(mlflow_client, parent.run_id, RunStatus.KILLED,
                                                     "interrupted before its worker could close it")
                        raise
                    runs.close_orphaned_children(mlflow_client, parent.run_id, RunStatus.CRASHED,
                                                 "its worker process exited without closing it")
                    for i in lost:  # its worker died (killed, out of memory): its run is redone next time
                        ended(todo[i], Outcome(RunStatus.FAILED, error="its worker process exited without a result"))
                else:
                    for combo in todo:
                        steps = StepProgress(lambda step, max_steps, key=combo.key: progress.step(key, step, max_steps))
                        ended(combo, run_combination(spec, combo, run_overrides, parent.run_id,
                                                     [steps, *extra_callbacks]))
            out_dir = publish_ablation(mlflow_client, parent.run_id)
    except (KeyboardInterrupt, SystemExit):
        print(f"pcl: ablation '{spec.name}' interrupted; run the same command to resume", file=sys.stderr)
        return 130
    failed = f"{failures} of {len(todo)} runs failed; " if failures else ""
    print(f"ablation '{spec.name}': {failed}summary in {out_dir / 'summary.md'}")
    return 1 if failures else 0
