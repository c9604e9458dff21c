"""The life of an MLflow run: one status table, and a Ctrl-C that lands inside an MLflow write."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import yaml
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pc_lightning import tracking
from pc_lightning.config import TrackingConfig
from pc_lightning.held_interrupt import HeldInterrupt
from pc_lightning.sweep import runs
from pc_lightning.tracked_run import MLFLOW_STATUS, RunStatus, TrackedRun
from conftest import tiny_overrides
from helpers import ROOT, write_sweep_spec


@pytest.fixture()
def restore_sigint():
    """Lightning ignores SIGINT after a Ctrl-C; give Python's handler back after the test."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("status", list(RunStatus))
def test_each_status_closes_the_run_as_its_table_says(results_dir, status):
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    uri = tracking.tracking_uri(TrackingConfig())
    run = TrackedRun.create(client, uri, "lifecycle", "r", {"pcl.name": "r"})
    assert client.get_run(run.run_id).info.status == "RUNNING"
    run.close(status)
    run.close(RunStatus.FINISHED)  # closed once: a second close changes nothing
    closed = client.get_run(run.run_id)
    assert closed.info.status == MLFLOW_STATUS[status] and closed.data.tags["status"] == status
    assert RunStatus.of(closed) == status
    assert TrackedRun.reopen(client, run.run_id).reopened and client.get_run(run.run_id).info.status == "RUNNING"
    assert RunStatus.of(client.get_run(run.run_id)) is None  # running again


@pytest.mark.parametrize("error, status", [(None, RunStatus.FINISHED), (KeyboardInterrupt(), RunStatus.KILLED),
                                           (SystemExit(1), RunStatus.KILLED), (OSError("disk"), RunStatus.FAILED)])
def test_leaving_the_block_closes_the_run(results_dir, error, status):
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    run = TrackedRun.create(client, tracking.tracking_uri(TrackingConfig()), "lifecycle", "r", {})
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with run:
            if error:
                raise error
    closed = client.get_run(run.run_id)
    assert closed.info.status == status.mlflow_status and closed.data.tags["status"] == status
    assert ("error" in closed.data.tags) == (status == RunStatus.FAILED)


def test_sigint_while_held_is_raised_when_the_outermost_hold_ends(restore_sigint):
    outer, inner = HeldInterrupt(), HeldInterrupt()
    outer.hold()
    with inner:
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised
    with pytest.raises(KeyboardInterrupt):
        outer.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    outer.release()  # idempotent


def test_a_second_sigint_while_held_is_raised_at_once(restore_sigint):
    with pytest.raises(KeyboardInterrupt):
        with HeldInterrupt():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the user insists
            pytest.fail("not reached")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_is_not_held(restore_sigint):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with HeldInterrupt():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.fixture()
def ctrl_c_inside_first_train_loss_write():
    """Sends SIGINT from inside MLflow's SQLite write of the first ``train/loss`` metric: after the INSERT has
    begun its transaction, before it is committed (a SQLAlchemy hook on every engine's statement execution)."""
    sent = []

    def interrupt(conn, cursor, statement, parameters, context, executemany):
        metrics_insert = statement.lstrip().upper().startswith("INSERT INTO METRICS")
        if not sent and metrics_insert and "train/loss" in str(parameters):
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(Engine, "after_cursor_execute", interrupt)
    yield sent
    event.remove(Engine, "after_cursor_execute", interrupt)


def test_ctrl_c_inside_an_mlflow_write_ends_ablation_run_and_parent_killed(
        tmp_path, data_cache, results_dir, restore_sigint, ctrl_c_inside_first_train_loss_write):
    from pc_lightning.sweep.ablation import run_ablation

    spec = {"name": "ctrlc", "base": str(ROOT / "conf" / "baseline.yaml"),
            "overrides": tiny_overrides(data_cache, results_dir), "variants": {"baseline": []}}
    (tmp_path / "ctrlc.yaml").write_text(yaml.safe_dump(spec))

    assert run_ablation(str(tmp_path / "ctrlc.yaml")) == 130
    assert ctrl_c_inside_first_train_loss_write, "no train/loss write was interrupted"
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "ablation", "ctrlc")
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "killed"
    (child,) = runs.children(client, parent)
    assert child.info.status == "KILLED" and child.data.tags["status"] == "killed"
    # the interrupted write was completed before the KeyboardInterrupt was raised: the metrics so far are there
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1]
    assert "val/unigram_entropy" in child.data.metrics


def test_ctrl_c_inside_an_mlflow_write_ends_trial_run_and_study_parent_killed(
        tmp_path, data_cache, results_dir, restore_sigint, ctrl_c_inside_first_train_loss_write):
    from pc_lightning.sweep.study import run_sweep

    spec_path = write_sweep_spec(tmp_path / "sweep.yaml", overrides=tiny_overrides(data_cache, results_dir),
                                 n_trials=1)
    assert run_sweep(str(spec_path)) == 130
    assert ctrl_c_inside_first_train_loss_write, "no train/loss write was interrupted"
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "study", "tiny-lr")
    assert parent.info.status == "KILLED"
    (child,) = runs.children(client, parent)
    assert child.info.status == "KILLED" and child.data.tags["status"] == "killed"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1]
