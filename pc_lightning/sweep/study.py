"""``pcl sweep``: run, resume or join an Optuna study declared in a sweep file (DESIGN.md section 7).

Each trial is one :func:`pc_lightning.train.train` run, nested under the study's MLflow parent run
(tags ``pcl.study``, ``pcl.trial``). The rules that make re-running the same command safe:

* **Budget = finished trials.** ``n_trials`` counts COMPLETE + PRUNED trials. Before each trial the worker
  counts them, plus trials RUNNING in other live workers and WAITING retries; it starts a trial only while
  that total is below ``n_trials`` (or a retry is waiting), and it waits for running trials of other
  workers before exiting. So an interrupted study resumes where it stopped, and no trial is run twice.
* **Crashes are retried.** RDB storages (SQLite, PostgreSQL, ...) record a heartbeat every
  ``heartbeat.interval`` seconds; a trial silent for ``heartbeat.grace_period`` seconds (its worker was
  killed) is failed and re-queued with the same parameters by ``RetryHeartbeatStaleTrialCallback``; its MLflow run
  is closed as FAILED with tag ``status=crashed``. A Ctrl-C'd trial ends FAIL (MLflow: KILLED) and a new
  trial replaces it. Optuna 5's journal storage has no heartbeat: there a killed trial stays RUNNING and is
  not counted, so several workers on a journal file may run up to workers-1 extra trials.
* **Diverged trials are results, not crashes.** A trial whose run diverged completes with the objective's
  worst value: ``objective.diverged_value`` if set, else the loss of a uniform predictor, ln(vocab) (the
  loss at initialisation) for ``*loss`` metrics and vocab for ``*ppl`` metrics. Its trial gets the user
  attribute ``diverged=True`` and its MLflow run the tag ``status=diverged``.
* **Pruned trials** end PRUNED in Optuna; their MLflow run is set KILLED with tag ``status=pruned``.

``--workers N`` starts N ``pcl sweep`` worker processes on this machine sharing the storage; other machines
join by running the same command with the same ``--storage`` URL (PostgreSQL, or a journal file on a shared
disk) and ``tracking.tracking_uri``. A trial runs on one device: with several GPUs, run one worker per GPU.
Multi-GPU (DDP) trials are refused: Lightning's launcher re-runs the command on every rank, and each rank
would ask Optuna for a trial of its own; they would need rank 0's trial shared with all ranks through
``optuna.integration.TorchDistributedTrial``, which ``pcl sweep`` does not wire up.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pc_lightning import tracking
from pc_lightning.config import ConfigError, ExperimentConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.pruning import OptunaPruning
from pc_lightning.train import train, world_size
from pc_lightning.sweep.space import (SweepSpec, build_pruner, build_sampler, compose_config, is_journal, load_spec,
                                      storage_url, suggest)

# Heartbeats, fail_stale_trials and the retry callback are still marked experimental in Optuna 5.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

WORKER_ENV = "PCL_SWEEP_WORKER"  # set in processes started by --workers: their index (seed offset), no report


def open_storage(url: str, spec: SweepSpec) -> optuna.storages.BaseStorage:
    """Journal file for *.log/*.journal paths, else an RDB storage with heartbeat and retry of crashed trials."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    engine_kwargs = None
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers write the same file
    hb = spec.heartbeat
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=hb.interval, grace_period=hb.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=hb.max_retry))


def open_study(spec: SweepSpec, url: str, worker: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=open_storage(url, spec), sampler=build_sampler(spec, worker),
                               pruner=build_pruner(spec), study_name=spec.study_name,
                               direction=spec.objective.direction, load_if_exists=True)


def diverged_value(spec: SweepSpec, cfg: ExperimentConfig) -> float:
    """The objective value a diverged trial counts as (see the module docstring)."""
    if spec.objective.diverged_value is not None:
        return spec.objective.diverged_value
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    return float(vocab) if spec.objective.metric.endswith("ppl") else math.log(vocab)


def trial_config(spec: SweepSpec, overrides: list[str], trial: optuna.trial.BaseTrial, parent_id: str) -> ExperimentConfig:
    cfg = compose_config(spec.base, list(spec.overrides) + list(overrides) + suggest(trial, spec))
    cfg.name = f"{spec.study_name}-trial{trial.number}"
    cfg.tracking.parent_run_id = parent_id
    cfg.tracking.run_name = f"trial-{trial.number}"
    cfg.tracking.tags.update({"pcl.kind": "trial", "pcl.study": spec.study_name, "pcl.trial": str(trial.number)})
    cfg.trainer.progress_bar = False
    return cfg


def close_crashed_runs(mlflow_client, parent_id: str, trial_number: int) -> None:
    """A retried trial's first MLflow run was left RUNNING by its killed worker: close it as crashed."""
    parent = mlflow_client.get_run(parent_id)
    for run in runs.children(mlflow_client, parent):
        if run.data.tags.get("pcl.trial") == str(trial_number) and run.info.status == "RUNNING":
            mlflow_client.set_terminated(run.info.run_id, "FAILED")
            mlflow_client.set_tag(run.info.run_id, "status", "crashed")


def make_objective(spec: SweepSpec, overrides: list[str], parent_id: str, mlflow_client):
    def objective(trial: optuna.Trial) -> float:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retried_from is not None:
            close_crashed_runs(mlflow_client, parent_id, retried_from)
        cfg = trial_config(spec, overrides, trial, parent_id)
        pruning = OptunaPruning(trial, spec.objective.metric)
        try:
            result = train(cfg, extra_callbacks=[pruning], quiet=True)
        except optuna.TrialPruned:
            if pruning.run_id:
                mlflow_client.set_terminated(pruning.run_id, "KILLED")
                mlflow_client.set_tag(pruning.run_id, "status", "pruned")
                mlflow_client.delete_tag(pruning.run_id, "error")
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("diverged", result.status == "diverged")
        if result.status == "diverged":
            return diverged_value(spec, cfg)
        value = result.metrics.get(spec.objective.metric)
        if value is None:
            raise ConfigError("objective.metric", f"'{spec.objective.metric}' was never logged by the run "
                                                  f"(logged: {sorted(result.metrics)})")
        return value

    return objective


def trial_counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def work(study: optuna.Study, spec: SweepSpec, n_trials: int, objective, timeout: float | None,
         heartbeat: bool) -> None:
    """One worker's loop: run trials until n_trials are finished (by anyone), or the timeout is reached."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        if heartbeat:
            optuna.storages.fail_stale_trials(study)  # may queue WAITING retries
        counts = trial_counts(study)
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        running = counts[TrialState.RUNNING] if heartbeat else 0
        if finished >= n_trials:
            return
        if counts[TrialState.WAITING] == 0 and finished + running >= n_trials:
            time.sleep(spec.heartbeat.interval)  # the last trials run elsewhere (or wait to be found stale)
            continue
        study.optimize(objective, n_trials=1)  # an error fails the trial and stops this command


def spawn_workers(spec_path: str, workers: int, n_trials: int, url: str, overrides: list[str]) -> int:
    """N local ``pcl sweep`` processes on one storage (each its own Python, so no fork of torch state)."""
    env = dict(os.environ, PCL_RESULTS_DIR=str(tracking.RESULTS_DIR.resolve()))
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "pc_lightning.cli", "sweep", str(spec_path), "--n-trials", str(n_trials),
               "--storage", url, *overrides]
        procs.append(subprocess.Popen(cmd, env={**env, WORKER_ENV: str(i)}))
    return max(p.wait() for p in procs)


def run_sweep(spec_path: str, workers: int = 1, n_trials: int | None = None, storage: str | None = None,
              overrides: list[str] | None = None) -> int:
    overrides = list(overrides or [])
    spec = load_spec(spec_path, overrides)
    n_total = n_trials or spec.n_trials
    url = storage_url(spec, storage)
    worker = int(os.environ.get(WORKER_ENV, "0"))
    is_worker_process = WORKER_ENV in os.environ
    if workers < 1:
        raise ConfigError("--workers", "must be >= 1")

    base = compose_config(spec.base, list(spec.overrides) + overrides)
    if world_size(base) > 1:
        # Lightning's DDP launcher re-runs this command on every rank and each would ask Optuna for its own
        # trial; multi-GPU trials need one trial shared by all ranks (TorchDistributedTrial), not wired here.
        raise ConfigError("trainer.devices", f"a sweep trial runs on one device, this config asks for "
                                             f"{world_size(base)}; run one worker per GPU "
                                             "(CUDA_VISIBLE_DEVICES=i pcl sweep ... trainer.devices=1)")

    study = open_study(spec, url, worker)
    uri = tracking.tracking_uri(base.tracking)
    mlflow_client = tracking.client(uri)
    parent_id = runs.find_or_create_parent(
        mlflow_client, uri, base.tracking.experiment, "study", spec.study_name,
        {"pcl.study": spec.study_name, "pcl.storage": url, "pcl.metric": spec.objective.metric,
         "pcl.spec": str(Path(spec_path).resolve())})

    rc = 0
    try:
        if workers > 1 and not is_worker_process:
            rc = spawn_workers(spec_path, workers, n_total, url, overrides)
        else:
            objective = make_objective(spec, overrides, parent_id, mlflow_client)
            work(study, spec, n_total, objective, spec.timeout, heartbeat=not is_journal(url))
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (Lightning raises SIGTERMException)
        if not is_worker_process:
            mlflow_client.set_terminated(parent_id, "KILLED")
        print(f"pcl: sweep '{spec.study_name}' interrupted; run the same command to resume", file=sys.stderr)
        return 130
    if is_worker_process:
        return rc

    from pc_lightning.sweep.report import publish_study

    out_dir = publish_study(study, mlflow_client, parent_id)
    counts = trial_counts(study)
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    mlflow_client.set_terminated(parent_id, "FINISHED" if finished >= n_total else "KILLED")
    print(f"study '{spec.study_name}': {finished}/{n_total} trials finished "
          f"({counts[TrialState.PRUNED]} pruned); summary in {out_dir}")
    return rc
