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

Every combination is one :func:`pc_lightning.train.train` run nested under one MLflow parent run per
ablation, tagged with its key ``variant|optimizer|lr|seed``. Re-running the command skips combinations
that already have a finished or diverged run under that parent and retries failed or killed ones. A
combination that fails (e.g. a variant whose code is not there yet) ends as a failed run carrying the error
(its run is created before anything else, :func:`pc_lightning.train.open_run`) and the grid goes on. At the
end ``results/<name>/`` (summary.md, runs.csv, PNG plots) is rendered from MLflow by
:mod:`pc_lightning.sweep.report` -- the same code ``pcl report`` uses -- and attached to the parent run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pc_lightning import tracking
from pc_lightning.config import ConfigError, ExperimentConfig, build
from pc_lightning.secrets import redact
from pc_lightning.sweep import runs
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


def is_done(run) -> bool:
    """Finished and diverged runs are results; failed, killed and running ones are redone."""
    return RunStatus.of(run) in (RunStatus.FINISHED, RunStatus.DIVERGED)


def run_ablation(spec_path: str, overrides: list[str] | None = None) -> int:
    """Run every missing combination, then render results/<name>/. Exit code 1 if any run failed."""
    from pc_lightning.sweep.report import publish_ablation
    from pc_lightning.train import train

    overrides = list(overrides or [])
    spec = load_ablation(spec_path)
    grid = combinations(spec)
    for combo in grid:  # every combination is a valid config before anything runs
        run_config(spec, combo, overrides, None)

    base = compose_config(spec.base, list(spec.overrides) + overrides)
    tracking.check_server(base.tracking)  # a tracking server that is down or refuses us: one line, in seconds
    uri = tracking.tracking_uri(base.tracking)
    mlflow_client = tracking.client(uri)
    parent = runs.find_or_create_parent(mlflow_client, uri, base.tracking.experiment, "ablation", spec.name, {
        "pcl.ablation": spec.name, "pcl.spec": str(Path(spec_path).resolve()),
        "pcl.variants": json.dumps(list(spec.variants)), "pcl.optimizers": json.dumps(list(spec.optimizers)),
        "pcl.reference": spec.reference_variant})
    failures = 0
    try:
        with parent:  # finished, or killed by Ctrl-C/SIGTERM (Lightning raises SIGTERMException), or failed
            done = {r.data.tags.get("pcl.key")
                    for r in runs.children(mlflow_client, mlflow_client.get_run(parent.run_id))
                    if is_done(r)}
            todo = [c for c in grid if c.key not in done]
            print(f"ablation '{spec.name}': {len(grid)} runs, {len(grid) - len(todo)} already done, {len(todo)} to run")
            for i, combo in enumerate(todo, 1):
                cfg = run_config(spec, combo, overrides, parent.run_id)
                started = time.time()
                try:
                    result = train(cfg, quiet=True)
                    print(f"[{i}/{len(todo)}] {combo.key}: {result.status}, val/loss="
                          f"{result.metrics.get('val/loss', float('nan')):.4f} ({time.time() - started:.0f}s)")
                except Exception as e:  # one broken combination must not stop the grid; its run ended failed
                    failures += 1
                    print(redact(f"[{i}/{len(todo)}] {combo.key}: FAILED: {type(e).__name__}: {e}"), file=sys.stderr)
            out_dir = publish_ablation(mlflow_client, parent.run_id)
    except (KeyboardInterrupt, SystemExit):
        print(f"pcl: ablation '{spec.name}' interrupted; run the same command to resume", file=sys.stderr)
        return 130
    print(f"ablation '{spec.name}': summary in {out_dir / 'summary.md'}")
    return 1 if failures else 0
