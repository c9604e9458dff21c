"""Sweeps whose trials run on several ranks: torchrun on CPU (gloo), 2 ranks, only rank 0 talks to Optuna/MLflow."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from pc_lightning import tracking
from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.space import load_spec, storage_url
from pc_lightning.sweep.study import open_study, run_sweep
from conftest import tiny_overrides
from helpers import write_sweep_spec

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = {"trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.num_threads": 1}


def write_spec(path: Path, data_cache: str, results_dir: Path, **fields) -> Path:
    """The tiny sweep with every trial a DDP run over two CPU processes."""
    defaults = {"study_name": "ddp-lr", "overrides": tiny_overrides(data_cache, results_dir, **TWO_RANKS),
                "n_trials": 2, "heartbeat": {"interval": 1, "grace_period": 5, "max_retry": 2}}
    return write_sweep_spec(path, **{**defaults, **fields})


def start_torchrun(spec_path: Path, results_dir: Path, nproc: int = 2,
                   ctrl_c_at: int | None = None) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node N -m pc_lightning.cli sweep SPEC`` in a session of its own,
    output to ``torchrun.log`` beside the spec (a pipe nobody reads while it runs could fill and block the ranks).
    ``ctrl_c_at``: rank 0 sends SIGINT to torchrun and every rank after that step of the first trial
    (tests/sweep_worker.py), as a Ctrl-C in the terminal would."""
    env = dict(os.environ, PCL_RESULTS_DIR=str(results_dir), OMP_NUM_THREADS="1")
    sweep = ["-m", "pc_lightning.cli", "sweep", str(spec_path)] if ctrl_c_at is None else \
        [str(ROOT / "tests" / "sweep_worker.py"), str(spec_path), "INT", str(ctrl_c_at)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *sweep]
    with open(spec_path.parent / "torchrun.log", "w") as log:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_torchrun(proc: subprocess.Popen, spec_path: Path, timeout: float = 240) -> tuple[int, str]:
    """Exit code and output tail; a rank hanging in a collective fails the test at the timeout."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        proc.wait()
        log = (spec_path.parent / "torchrun.log").read_text()
        pytest.fail(f"the torchrun sweep hung for {timeout} s:\n{log[-6000:]}")
    return proc.returncode, (spec_path.parent / "torchrun.log").read_text()[-8000:]


def torchrun_sweep(spec_path: Path, results_dir: Path, nproc: int = 2, timeout: float = 240) -> tuple[int, str]:
    return wait_torchrun(start_torchrun(spec_path, results_dir, nproc), spec_path, timeout)


@pytest.mark.slow
def test_two_rank_trials_with_pruning_leave_one_study_and_one_run_per_trial(tmp_path, data_cache, results_dir):
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir,
                           pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    spec = load_spec(spec_path)
    # a good LR, then one that barely moves the loss: the median pruner stops it at its first validation
    study = open_study(spec, storage_url(spec))
    for lr in (1e-2, 1e-4):
        study.enqueue_trial({"optim.lr": lr})

    rc, output = torchrun_sweep(spec_path, results_dir)
    assert rc == 0, output

    study = open_study(spec, storage_url(spec))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]  # none from rank 1
    assert [t.last_step for t in study.trials] == [6, 3]
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "study", "ddp-lr")
    assert parent.info.status == "FINISHED"
    children = runs.children(client, parent)
    assert sorted(c.data.tags["pcl.trial"] for c in children) == ["0", "1"]  # no duplicate run from rank 1
    by_trial = {int(c.data.tags["pcl.trial"]): c for c in children}
    assert by_trial[0].info.status == "FINISHED" and by_trial[0].data.params["trainer.devices"] == "2"
    assert by_trial[1].info.status == "KILLED" and by_trial[1].data.tags["status"] == "pruned"
    assert study.trials[0].user_attrs["mlflow_run_id"] == by_trial[0].info.run_id


def test_multi_device_trials_without_torchrun_are_refused(tmp_path, data_cache, results_dir):
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir)
    with pytest.raises(ConfigError) as err:
        run_sweep(str(spec_path))
    assert err.value.key == "trainer.devices" and "torchrun --nproc_per_node 2" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run_sweep(str(spec_path), workers=2)
    assert err.value.key == "--workers"
    assert not (results_dir / "mlflow.db").exists() and not (results_dir / "optuna.db").exists()


@pytest.mark.slow
def test_rank_count_must_match_trainer_devices(tmp_path, data_cache, results_dir):
    overrides = tiny_overrides(data_cache, results_dir, **{**TWO_RANKS, "trainer.devices": 3})
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, overrides=overrides)
    rc, output = torchrun_sweep(spec_path, results_dir, nproc=2, timeout=120)
    assert rc != 0 and "'trainer.devices'" in output and "2 processes were started" in output
    assert not (results_dir / "optuna.db").exists()


@pytest.mark.slow
def test_diverged_two_rank_trial_counts_as_worst_value(tmp_path, data_cache, results_dir):
    overrides = tiny_overrides(data_cache, results_dir, **TWO_RANKS, **{"monitor.divergence_margin": 1e-9})
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, n_trials=1, overrides=overrides)
    rc, output = torchrun_sweep(spec_path, results_dir)
    assert rc == 0, output
    (trial,) = open_study(load_spec(spec_path), storage_url(load_spec(spec_path))).trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["diverged"] is True
    assert trial.value == pytest.approx(math.log(512))


@pytest.mark.slow
def test_interrupted_two_rank_sweep_resumes_without_duplicates(tmp_path, data_cache, results_dir):
    # Ctrl-C inside trial 0's training, after its step-3 checkpoint and validation
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir)
    rc, output = wait_torchrun(start_torchrun(spec_path, results_dir, ctrl_c_at=4), spec_path, timeout=240)
    assert rc != 0
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "study", "ddp-lr")
    assert parent.info.status == "KILLED", output
    assert [c.data.tags.get("status") for c in runs.children(client, parent)] == ["killed"]

    # the interrupted trial is re-queued once its heartbeat is stale; meanwhile rank 0 keeps rank 1 waiting
    rc, output = torchrun_sweep(spec_path, results_dir)
    assert rc == 0, output

    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1 and len(states) == 3
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert any(t.params == failed.params for t in study.trials if t.state == TrialState.COMPLETE)  # retried
    parent = runs.find_parent(client, "study", "ddp-lr")
    assert parent.info.status == "FINISHED"
    statuses = sorted(c.data.tags.get("status") for c in runs.children(client, parent))
    assert statuses == ["finished", "finished", "killed"]
