"""``pcl sweep``: run, resume or join an Optuna study declared in a sweep file; docs/sweeps.md).

Each trial is one :func:`pc_lightning.train.train` run, nested under the study's MLflow parent run
(tags ``pcl.study``, ``pcl.trial``). The rules that make re-running the same command safe:

* **Budget = finished trials.** ``n_trials`` counts COMPLETE + PRUNED trials. Before each trial the worker
  counts them, plus trials RUNNING in other live workers and WAITING retries; it starts a trial only while
  that total is below ``n_trials`` (or a retry is waiting), and it waits for running trials of other
  workers before exiting. So an interrupted study resumes where it stopped, and no trial is run twice. Workers
  count under a lock (a file lock, or a PostgreSQL advisory lock shared by all machines:
  :mod:`pc_lightning.sweep.start_lock`), so they cannot all take the last slot.
* **Crashes are retried.** RDB storages (SQLite, PostgreSQL, ...) record a heartbeat every
  ``heartbeat.interval`` seconds; a trial silent for ``heartbeat.grace_period`` seconds (its worker was
  killed) is failed and re-queued with the same parameters by ``RetryHeartbeatStaleTrialCallback``; its MLflow run
  is closed as FAILED with tag ``status=crashed``. A trial Ctrl-C'd while it trains ends FAIL (MLflow: KILLED)
  and a new trial replaces it; a Ctrl-C after its training is held until Optuna has recorded the finished trial
  (:mod:`pc_lightning.held_interrupt`). Optuna 5's journal storage has no heartbeat: there a killed trial
  stays RUNNING and is not counted, so several workers on a journal file may run up to workers-1 extra trials.
* **Diverged trials are results, not crashes.** A trial whose run diverged completes with the objective's
  worst value: ``objective.diverged_value`` if set, else the loss of a uniform predictor, ln(vocab) (the
  loss at initialisation) for ``*loss`` metrics and vocab for ``*ppl`` metrics. Its trial gets the user
  attribute ``diverged=True`` and its MLflow run the tag ``status=diverged``.
* **Pruned trials** end PRUNED in Optuna; their MLflow run is set KILLED with tag ``status=pruned``.

``--workers N`` starts N ``pcl sweep`` worker processes on this machine sharing the storage, with ``cores // N``
threads each (:mod:`pc_lightning.sweep.workers`); the starting command shows the progress
(:mod:`pc_lightning.progress`; without the step of each trial, which runs in another process). Other machines
join by running the same command with the same ``--storage`` URL (PostgreSQL, or a journal file on a shared
disk) and ``tracking.tracking_uri`` (docs/multi-machine.md). The storage URL and the overrides reach the
``--workers`` processes through the environment, not their command lines, and the ``pcl.storage`` tag holds the
URL with its password redacted (:mod:`pc_lightning.secrets`).

**Multi-device trials** (``trainer.devices`` x ``trainer.num_nodes`` > 1, strategy ddp/fsdp): every rank is
started by ``torchrun`` or ``srun`` with the same command, and each trial is one Lightning DDP/FSDP run over
all ranks. The ranks join one process group before the first trial (gloo on CPU, nccl on GPU; Lightning's
strategy reuses an initialised group). Rank 0 alone opens the storage and MLflow, asks Optuna for trials
and tells their results; before each trial it broadcasts a command (``trial``, ``wait`` while other workers
finish the last trials, ``stop``). The trial's number and parameters reach the other ranks through
``optuna_integration.TorchDistributedTrial``, and every rank replays them into the same config
(:class:`optuna.trial.FixedTrial`), so all ranks run the same :func:`~pc_lightning.train.train`.
:class:`~pc_lightning.sweep.pruning.OptunaPruning` reports rank 0's value and ``should_prune()`` is
broadcast, so all ranks stop a pruned trial at the same validation; divergence is decided on the mean loss
over ranks (:class:`~pc_lightning.modules.pretrain.PretrainModule`), so all ranks stop a diverged trial
together. Ctrl-C or SIGTERM reaches every rank through torchrun/srun and ends the trial as above. A crash of
one rank ends the command (torchrun stops the other ranks; under SLURM use ``srun --kill-on-bad-exit=1``);
a trial whose rank 0 was killed is re-queued by the heartbeat when the same command is run again.
``--workers`` > 1 is refused here: run one ``torchrun``/``srun`` per multi-device worker, all on the same
storage. Started without torchrun/srun, a multi-device config is refused (Lightning's own launcher would
re-run the whole sweep on every rank, each asking Optuna for a trial of its own).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import optuna
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from optuna.trial import TrialState
from optuna_integration import TorchDistributedTrial

from pc_lightning import tracking
from pc_lightning.config import ConfigError, ExperimentConfig
from pc_lightning.distributed import exit_follower, leave_together
from pc_lightning.held_interrupt import HeldInterrupt
from pc_lightning.sweep import runs
from pc_lightning.sweep.pruning import OptunaPruning
from pc_lightning.sweep.start_lock import StartLock
from pc_lightning.sweep.storage import ReconnectingRDBStorage, describe
from pc_lightning.sweep.trial_progress import TrialProgress
from pc_lightning.sweep.workers import thread_environment
from pc_lightning.secrets import redact
from pc_lightning.train import train, world_size
from pc_lightning.sweep.space import (SweepSpec, build_pruner, build_sampler, compose_config, is_journal, load_spec,
                                      storage_url, suggest)
from pc_lightning.tracked_run import RUNNING, RunStatus, TrackedRun

# Heartbeats, fail_stale_trials and the retry callback are still marked experimental in Optuna 5.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

WORKER_ENV = "PCL_SWEEP_WORKER"  # set in processes started by --workers: their index (seed offset), no report
# --workers children get the storage URL and the overrides through the environment, not their command line
# (which every user of the machine can read): either may hold a password
STORAGE_ENV, OVERRIDES_ENV = "PCL_SWEEP_STORAGE", "PCL_SWEEP_OVERRIDES"
TRIAL, WAIT, STOP = "trial", "wait", "stop"  # rank 0's commands to the other ranks of a multi-device worker
POLL_EVERY = 2.0  # seconds between the starting command's looks at the study while --workers run


@dataclass
class Ranks:
    """The processes of one multi-device worker (started by torchrun or srun), joined in one process group."""

    rank: int
    group: dist.ProcessGroup  # gloo, for Python objects on CPU, also when training itself runs on nccl

    def share(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank; a collective, so every rank calls it at the same point."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def finish(self) -> None:
        """Leave together: every rank waits until rank 0 has published the study, then the group closes."""
        leave_together(self.group)


def launch_environment() -> ClusterEnvironment | None:
    """The environment srun or torchrun started this process in, detected in the order Lightning's Trainer uses."""
    for env_type in (SLURMEnvironment, TorchElasticEnvironment):
        if env_type.detect():
            return env_type()
    return None


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join_ranks(cfg: ExperimentConfig, spec_path: str) -> Ranks:
    """Join all ranks in one process group before the first trial; every trial's DDP/FSDP strategy reuses it
    (Lightning initialises the group only when none exists)."""
    n = world_size(cfg)
    env = launch_environment()
    if env is None or env.world_size() != n:
        started = "it was not started by torchrun or srun" if env is None else \
            f"{env.world_size()} processes were started"
        raise ConfigError("trainer.devices", f"each trial trains on {n} devices but {started}; run 'torchrun "
                                             f"--nproc_per_node {n} -m pc_lightning.cli sweep {spec_path} ... "
                                             f"trainer.devices={n} trainer.strategy=ddp' (or srun with {n} tasks), "
                                             "or set trainer.devices=1")
    if not dist.is_initialized():
        # the rendezvous Lightning's strategy would make at the first fit: env:// at the launcher's address
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
        on_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        device = torch.device("cuda", env.local_rank()) if on_gpu else None
        if device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=env.global_rank(), world_size=n, device_id=device)
        atexit.register(close_process_group)  # as Lightning does for NCCL, which warns about an open group
    group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
    return Ranks(dist.get_rank(), group)


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
    return ReconnectingRDBStorage(
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
    cfg.tracking.tags.update({"pcl.kind": "trial", "pcl.study": spec.study_name, "pcl.trial": str(trial.number),
                              "pcl.worker": f"{socket.gethostname()}:{os.getpid()}"})  # which process ran it
    cfg.trainer.progress_bar = False
    return cfg


def close_crashed_runs(mlflow_client, parent_id: str, trial_number: int, retry_number: int | None = None) -> None:
    """A retried trial's first MLflow run was left RUNNING by its killed worker: close it as crashed."""
    parent = mlflow_client.get_run(parent_id)
    for run in runs.children(mlflow_client, parent):
        if run.data.tags.get("pcl.trial") == str(trial_number) and run.info.status == RUNNING:
            worker = run.data.tags.get("pcl.worker", "?")
            TrackedRun(mlflow_client, run.info.run_id).close(
                RunStatus.CRASHED, error=f"worker {worker} stopped without closing this run (its Optuna heartbeat "
                                         f"went stale); trial {retry_number} re-runs the same parameters")


def make_objective(spec: SweepSpec, overrides: list[str], parent_id: str, mlflow_client, held: HeldInterrupt,
                   ranks: Ranks | None = None, extra_callbacks: list[L.Callback] = ()):
    """The Optuna objective: one training run. Once training has ended, a Ctrl-C is held until Optuna has
    recorded the trial (``held``, released by :func:`work`), so a finished run never becomes a failed trial."""
    def objective(trial: optuna.Trial) -> float:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retried_from is not None:
            close_crashed_runs(mlflow_client, parent_id, retried_from, trial.number)
        cfg = trial_config(spec, overrides, trial, parent_id)
        # with several ranks: send the trial's number and parameters, report and decide pruning for all
        pruning = OptunaPruning(trial if ranks is None else TorchDistributedTrial(trial, ranks.group),
                                spec.objective.metric)
        try:
            result = train(cfg, extra_callbacks=[pruning, *extra_callbacks], quiet=True)  # pruned: status pruned
        except optuna.TrialPruned:
            held.hold()
            raise
        held.hold()
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("diverged", result.status == RunStatus.DIVERGED)
        if result.status == RunStatus.DIVERGED:
            return diverged_value(spec, cfg)
        value = result.metrics.get(spec.objective.metric)
        if value is None:
            raise ConfigError("objective.metric", f"'{spec.objective.metric}' was never logged by the run "
                                                  f"(logged: {sorted(result.metrics)})")
        return value

    return objective


def follow_rank_zero(spec: SweepSpec, overrides: list[str], ranks: Ranks,
                     extra_callbacks: list[L.Callback] = ()) -> int:
    """Ranks > 0 of a multi-device worker: run every trial rank 0 starts, with its parameters, until it stops."""
    try:
        parent_id = ranks.share()
        while (command := ranks.share()) != STOP:
            if command != TRIAL:
                continue  # WAIT: rank 0 waits for other workers' trials
            trial = TorchDistributedTrial(None, ranks.group)
            cfg = trial_config(spec, overrides, optuna.trial.FixedTrial(trial.params, trial.number), parent_id)
            try:
                train(cfg, extra_callbacks=[OptunaPruning(trial, spec.objective.metric), *extra_callbacks], quiet=True)
            except optuna.TrialPruned:
                pass
    except (KeyboardInterrupt, SystemExit):
        return 130
    ranks.finish()
    exit_follower(0)


def trial_counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def work(study: optuna.Study, spec: SweepSpec, n_trials: int, objective, timeout: float | None,
         heartbeat: bool, lock: StartLock, held: HeldInterrupt, ranks: Ranks | None = None,
         on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> None:
    """One worker's loop: run trials until n_trials are finished (by anyone), or the timeout is reached.
    With ranks, rank 0 tells the others each step (:func:`follow_rank_zero`). ``lock`` is held from the count
    until the new trial is RUNNING in the storage (:mod:`pc_lightning.sweep.start_lock`); a Ctrl-C after the
    objective's training is raised once the trial is recorded (:mod:`pc_lightning.held_interrupt`).
    ``on_trial_end`` is called with each trial this worker has finished (completed or pruned)."""
    tell = ranks.share if ranks is not None else (lambda command: None)

    def started(trial: optuna.Trial):
        lock.release()  # the trial is RUNNING in the storage: other workers' counts include it now
        return objective(trial)

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while deadline is None or time.monotonic() < deadline:
            lock.acquire()
            if heartbeat:
                optuna.storages.fail_stale_trials(study)  # may queue WAITING retries
            counts = trial_counts(study)
            finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            running = counts[TrialState.RUNNING] if heartbeat else 0
            if finished >= n_trials:
                break
            if counts[TrialState.WAITING] == 0 and finished + running >= n_trials:
                lock.release()
                time.sleep(spec.heartbeat.interval)  # the last trials run elsewhere (or wait to be found stale)
                tell(WAIT)  # keeps the other ranks' broadcast within the process group's timeout
                continue
            tell(TRIAL)
            try:
                study.optimize(started, n_trials=1,  # an error fails the trial and stops this command
                               callbacks=[on_trial_end] if on_trial_end else None)
            finally:
                held.release()
            lock.release()
    finally:
        lock.release()
    tell(STOP)


def spawn_workers(spec_path: str, workers: int, n_trials: int, url: str, overrides: list[str],
                  worker_index: int = 0, poll: Callable[[], None] | None = None) -> int:
    """N local ``pcl sweep`` processes on one storage (each its own Python, so no fork of torch state), each with
    ``cores // N`` threads (:mod:`pc_lightning.sweep.workers`); ``poll`` is called every few seconds while they
    run."""
    env = dict(os.environ, PCL_RESULTS_DIR=str(tracking.RESULTS_DIR.resolve()), **{
        STORAGE_ENV: url, OVERRIDES_ENV: json.dumps(overrides)})
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "pc_lightning.cli", "sweep", str(spec_path), "--n-trials", str(n_trials),
               "--worker-index", str(worker_index)]
        procs.append(subprocess.Popen(cmd, env={**env, **thread_environment(workers), WORKER_ENV: str(i)}))
    while True:
        running = any(p.poll() is None for p in procs)
        if poll is not None:
            poll()
        if not running:
            return max(p.returncode for p in procs)
        time.sleep(POLL_EVERY)


def run_sweep(spec_path: str, workers: int = 1, n_trials: int | None = None, storage: str | None = None,
              overrides: list[str] | None = None, worker_index: int = 0,
              extra_callbacks: list[L.Callback] = ()) -> int:
    """Run, resume or join the study. ``worker_index`` numbers the commands (machines, torchrun jobs) that join
    one study, so that their samplers get different seeds (``sampler.seed + 1000·worker_index + local worker``);
    with the same seed they would propose the same first points. ``extra_callbacks`` join every trial's
    Trainer in this process (not in the processes ``workers`` > 1 starts)."""
    overrides = list(overrides or [])
    if WORKER_ENV in os.environ and STORAGE_ENV in os.environ:  # a --workers child (see spawn_workers)
        storage, overrides = os.environ[STORAGE_ENV], json.loads(os.environ.get(OVERRIDES_ENV, "[]"))
    spec = load_spec(spec_path, overrides)
    n_total = n_trials or spec.n_trials
    url = storage_url(spec, storage)
    if worker_index < 0:
        raise ConfigError("--worker-index", "must be >= 0")
    worker = 1000 * worker_index + int(os.environ.get(WORKER_ENV, "0"))
    is_worker_process = WORKER_ENV in os.environ
    if workers < 1:
        raise ConfigError("--workers", "must be >= 1")

    base = compose_config(spec.base, list(spec.overrides) + overrides)
    ranks = None
    if world_size(base) > 1:
        if workers > 1:
            raise ConfigError("--workers", "multi-device trials run one worker per torchrun/srun command; start "
                                           "several such commands on the same --storage instead")
        ranks = join_ranks(base, spec_path)
        if ranks.rank > 0:
            return follow_rank_zero(spec, overrides, ranks, extra_callbacks)

    tracking.check_server(base.tracking)  # before anything else: a server that is down is one line, in seconds
    study = open_study(spec, url, worker)
    uri = tracking.tracking_uri(base.tracking)
    mlflow_client = tracking.client(uri)
    parent = runs.find_or_create_parent(
        mlflow_client, uri, base.tracking.experiment, "study", spec.study_name,
        {"pcl.study": spec.study_name, "pcl.storage": redact(url), "pcl.metric": spec.objective.metric,
         "pcl.spec": str(Path(spec_path).resolve())})
    if ranks is not None:
        ranks.share(parent.run_id)

    rc = 0
    try:
        # The command that started the workers owns the parent run: finished once n_trials are finished,
        # killed by Ctrl-C/SIGTERM (Lightning raises SIGTERMException) or a timeout, failed by an error.
        with parent if not is_worker_process else contextlib.nullcontext():
            # the progress display is the starting command's (spawn_workers' processes show none)
            progress = None if is_worker_process else TrialProgress(study, spec, n_total)
            with progress or contextlib.nullcontext():
                if workers > 1 and not is_worker_process:
                    rc = spawn_workers(spec_path, workers, n_total, url, overrides, worker_index, poll=progress.poll)
                else:
                    held = HeldInterrupt()
                    steps = [progress.steps] if progress else []
                    objective = make_objective(spec, overrides, parent.run_id, mlflow_client, held, ranks,
                                               [*extra_callbacks, *steps])
                    work(study, spec, n_total, objective, spec.timeout, heartbeat=not is_journal(url),
                         lock=StartLock(url, spec.study_name), held=held, ranks=ranks,
                         on_trial_end=progress and progress.trial_ended)
            if is_worker_process:
                return rc

            from pc_lightning.sweep.report import publish_study

            out_dir = publish_study(study, mlflow_client, parent.run_id)
            counts = trial_counts(study)
            finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            parent.finish(RunStatus.FINISHED if finished >= n_total else RunStatus.KILLED)
    except optuna.exceptions.StorageInternalError as e:  # the database was away longer than the storage retries
        print(f"pcl: sweep '{spec.study_name}' stopped: the Optuna storage {redact(url)} failed ({describe(e)}); "
              "run the same command to resume", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        print(f"pcl: sweep '{spec.study_name}' interrupted; run the same command to resume", file=sys.stderr)
        return 130
    print(f"study '{spec.study_name}': {finished}/{n_total} trials finished "
          f"({counts[TrialState.PRUNED]} pruned); summary in {out_dir}")
    if ranks is not None:
        ranks.finish()
    return rc
