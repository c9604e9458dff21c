"""Optuna sweeps: trial budget, nesting in MLflow, pruning, resume after a kill, parallel workers, bad files."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pc_lightning import tracking
from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.space import load_spec, storage_url
from pc_lightning.sweep.study import open_study, run_sweep
from pc_lightning.sweep.workers import threads_per_worker
from conftest import tiny_overrides
from helpers import write_sweep_spec

ROOT = Path(__file__).resolve().parents[1]


def write_spec(path: Path, data_cache: str, results_dir: Path, **fields) -> Path:
    return write_sweep_spec(path, **{"overrides": tiny_overrides(data_cache, results_dir), **fields})


def mlflow_children(study_name: str):
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "study", study_name)
    return client, parent, (runs.children(client, parent) if parent else [])


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_three_trials_nested_under_one_parent_with_pruning(tmp_path, data_cache, results_dir, storage):
    fields = {"pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    if storage == "journal":
        fields["storage"] = str(tmp_path / "optuna.journal")
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, **fields)
    spec = load_spec(spec_path)
    # a good LR first, then two that barely move the loss: the median pruner stops those at the first validation
    study = open_study(spec, storage_url(spec))
    for lr in (1e-2, 1e-4, 1e-4):
        study.enqueue_trial({"optim.lr": lr})

    assert run_sweep(str(spec_path)) == 0

    study = open_study(spec, storage_url(spec))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [t.last_step for t in study.trials] == [6, 3, 3]  # reported by optimizer step, not by epoch
    client, parent, children = mlflow_children("tiny-lr")
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.tags["pcl.trial"] for c in children) == ["0", "1", "2"]
    by_trial = {int(c.data.tags["pcl.trial"]): c for c in children}
    assert by_trial[0].info.status == "FINISHED"
    for n in (1, 2):
        assert by_trial[n].info.status == "KILLED" and by_trial[n].data.tags["status"] == "pruned"
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["best_trial"] == "0" and "best.optim.lr" in parent.data.tags
    out = results_dir / "sweeps" / "tiny-lr"
    assert (out / "summary.md").exists() and (out / "trials.csv").exists() and (out / "optimization_history.png").exists()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.md" in artifacts


def test_diverged_trial_counts_as_worst_value(tmp_path, data_cache, results_dir):
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, n_trials=1,
                           overrides=tiny_overrides(data_cache, results_dir) + ["monitor.divergence_margin=1e-9"])
    assert run_sweep(str(spec_path), n_trials=1) == 0
    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["diverged"] is True
    assert trial.value == pytest.approx(math.log(512))  # ln(vocab): the loss at initialisation


def interrupted_sweep(spec_path: Path, results_dir: Path, sig: signal.Signals, at_step: int) -> int:
    """``pcl sweep`` in a subprocess that receives ``sig`` after optimizer step ``at_step`` of its first trial
    (tests/sweep_worker.py); its exit code."""
    env = dict(os.environ, PCL_RESULTS_DIR=str(results_dir))
    cmd = [sys.executable, str(ROOT / "tests" / "sweep_worker.py"), str(spec_path), sig.name[3:], str(at_step)]
    return subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True, timeout=240).returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_sweep_resumes_without_duplicates(tmp_path, data_cache, results_dir, sig):
    # the signal arrives inside the first trial's training, after its step-3 checkpoint and validation
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, n_trials=2)
    rc = interrupted_sweep(spec_path, results_dir, sig, at_step=4)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130)

    assert run_sweep(str(spec_path)) == 0

    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    assert len(finished(study)) == 2
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1  # the interrupted one, replaced
    _, _, children = mlflow_children("tiny-lr")
    statuses = sorted(str(c.data.tags.get("status")) for c in children)
    assert statuses == sorted(["crashed" if sig == signal.SIGKILL else "killed", "finished", "finished"]), [
        (c.data.tags.get("pcl.trial"), c.info.status, c.data.tags.get("status"), c.data.tags.get("error")) for c in children]


def test_ctrl_c_while_optuna_records_a_trained_trial_keeps_it(tmp_path, data_cache, results_dir, monkeypatch):
    """A SIGINT after training, while Optuna stores the trial (here: at its first user attribute), is held until
    the trial is COMPLETE, then stops the sweep (exit 130); the resumed sweep runs only the second trial."""
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, n_trials=2)
    set_user_attr = optuna.trial.Trial.set_user_attr
    sent = []

    def interrupted(trial, key, value):
        if not sent:
            sent.append(key)
            os.kill(os.getpid(), signal.SIGINT)
        set_user_attr(trial, key, value)

    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", interrupted)
    assert run_sweep(str(spec_path)) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]

    assert run_sweep(str(spec_path)) == 0

    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    _, _, children = mlflow_children("tiny-lr")
    assert sorted((c.data.tags["pcl.trial"], c.info.status) for c in children) == [("0", "FINISHED"), ("1", "FINISHED")]
    assert study.trials[0].user_attrs["mlflow_run_id"] in {c.info.run_id for c in children}


def test_two_workers_share_one_study(tmp_path, data_cache, results_dir, capsys):
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, n_trials=4)
    assert run_sweep(str(spec_path), workers=2) == 0
    study = open_study(load_spec(spec_path), storage_url(load_spec(spec_path)))
    assert len(study.trials) == 4 and len(finished(study)) == 4
    children = mlflow_children("tiny-lr")[2]
    assert len(children) == 4
    assert {c.data.tags["pcl.threads"] for c in children} == {str(threads_per_worker(2))}  # cores // 2 each
    # the starting command shows the progress: a line per finished trial with the count, elapsed time and ETA
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert all(re.search(r"\] trial \d: val/loss=\d\.\d{4} \(\d+s\) · elapsed \d+:\d\d · ETA \d+:\d\d$", line)
               for line in lines), lines


@pytest.mark.parametrize("change, key", [
    ({"parameters": {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, "parameters.optim.lrr"),
    ({"parameters": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}}, "parameters.optim.lr.low"),
    ({"sampler": {"name": "bayes"}}, "sampler.name"),
    ({"pruner": {"name": "median", "patience": 3}}, "pruner"),
    ({"n_trails": 3}, "n_trails"),
    ({"overrides": ["trainer.devices=2"]}, "trainer.devices"),  # multi-device trials need torchrun/srun
    ({"parameters": {"model.linear": {"type": "categorical", "choices": ["dense", "sparse"]}}},
     "parameters.model.linear.choices[1]"),
])
def test_bad_sweep_file_stops_before_any_trial(tmp_path, data_cache, results_dir, capsys, change, key):
    from pc_lightning.cli import main

    if "overrides" in change:
        change = {"overrides": tiny_overrides(data_cache, results_dir) + change["overrides"]}
    spec_path = write_spec(tmp_path / "sweep.yaml", data_cache, results_dir, **change)
    with pytest.raises(ConfigError) as err:
        run_sweep(str(spec_path))
    assert err.value.key == key
    assert main(["sweep", str(spec_path)]) == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert not (results_dir / "mlflow.db").exists() and not (results_dir / "optuna.db").exists()
