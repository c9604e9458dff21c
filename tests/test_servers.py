"""The multi-machine path for real: a PostgreSQL Optuna storage and an MLflow tracking server (with its
basic-auth app) on 127.0.0.1 (tests/servers.py), faults injected into them, and no password in any record.

The tests marked ``servers`` start the servers (once per test run, or their own when they take them away).
The start-up checks at the top need no server: nothing listens on port 9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from conftest import MLFLOW_ADMIN_PASSWORD, MLFLOW_PASSWORD, PG_PASSWORD, tiny_overrides
from helpers import write_sweep_spec
from pc_lightning.cli import main
from pc_lightning.sweep import runs
from pc_lightning.sweep.space import load_spec
from pc_lightning.sweep.study import open_study

ROOT = Path(__file__).resolve().parents[1]
SECRETS = (PG_PASSWORD, MLFLOW_PASSWORD, MLFLOW_ADMIN_PASSWORD)
DOWN = "http://alice:pw-nobody-listens@127.0.0.1:9/"  # port 9 (discard): nothing listens there


@pytest.fixture(autouse=True)
def no_mlflow_credentials(monkeypatch):
    """Each test starts without MLflow credential variables and leaves none behind (pcl moves the credentials
    of a tracking URI into them)."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
        monkeypatch.delenv(key, raising=False)


def ablation_spec(path: Path, data_cache: str, results_dir: Path, name: str = "srv-abl", **extra) -> Path:
    spec = {"name": name, "base": str(ROOT / "conf" / "baseline.yaml"),
            "overrides": tiny_overrides(data_cache, results_dir, **extra),
            "variants": {"baseline": [], "qk_norm": ["variant/qk_norm"]}, "optimizers": {"adamw": []}, "seeds": [1]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def files_containing(root: Path, secrets=SECRETS) -> list[str]:
    """Every file under root whose bytes contain one of the secrets (databases, artifacts, checkpoints, CSVs)."""
    hits = []
    for path in Path(root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return hits


# ------------------------------------------------------------------------------------------------------------
# A tracking server that is down or refuses the credentials: one line, in seconds, before any data preparation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "sweep", "ablate"])
def test_unreachable_tracking_server_stops_before_data_preparation(command, tmp_path, results_dir, capfd):
    cache = tmp_path / "fresh-cache"  # a data cache of its own: nothing may be prepared into it
    overrides = tiny_overrides(str(cache), results_dir, **{"tracking.tracking_uri": DOWN})
    if command == "train":
        argv = ["train", "--config", str(ROOT / "conf" / "baseline.yaml"), *overrides]
    elif command == "sweep":
        argv = ["sweep", str(write_sweep_spec(tmp_path / "sweep.yaml", overrides=[])), *overrides]
    else:
        argv = ["ablate", str(ablation_spec(tmp_path / "abl.yaml", str(cache), results_dir)),
                f"tracking.tracking_uri={DOWN}"]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot reach the MLflow tracking server at http://alice:***@127.0.0.1:9/" in err
    assert "Connection refused" in err and "pw-nobody-listens" not in err
    assert not cache.exists() or not any(cache.iterdir())  # stopped before the data preparation
    assert not (results_dir / "optuna.db").exists()


@pytest.mark.servers
@pytest.mark.slow  # with the other server tests, so that the servers start once per test run
def test_wrong_mlflow_password_stops_before_training(mlflow_server, tmp_path, results_dir, capfd):
    cache = tmp_path / "fresh-cache"
    uri = f"http://alice:wrong-password-123@127.0.0.1:{mlflow_server.port}"
    assert main(["train", "--config", str(ROOT / "conf" / "baseline.yaml"),
                 *tiny_overrides(str(cache), results_dir, **{"tracking.tracking_uri": uri})]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the MLflow tracking server at http://alice:***@127.0.0.1:{mlflow_server.port} refused the " \
           "credentials (HTTP 401)" in err and "wrong-password-123" not in err
    assert not cache.exists() or not any(cache.iterdir())


# ------------------------------------------------------------------------------------------------------------
# Scale-out on real servers, and no password in any record
# ------------------------------------------------------------------------------------------------------------


def descendants_command_lines(pid: int) -> dict[int, str]:
    """Command lines of the running processes below ``pid`` (from /proc), by process id."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    family, lines = {pid}, {}
    for _ in range(4):
        family |= {p for p, parent in parents.items() if parent in family}
    for p in family - {pid}:
        try:
            lines[p] = (Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass
    return lines


@pytest.mark.servers
@pytest.mark.slow
def test_sweep_three_workers_on_postgres_and_mlflow_server(postgres, mlflow_server, tmp_path, data_cache,
                                                          results_dir, monkeypatch):
    """`pcl sweep --workers 3` with passwords in both URLs: exactly n_trials finished trials, each one nested
    MLflow run with its params, the parent's report uploaded through the server; no password written anywhere,
    neither on the workers' command lines nor in their output."""
    n_trials, study_name = 4, "srv-sweep"
    tracking_uri = f"http://alice:{MLFLOW_PASSWORD}@127.0.0.1:{mlflow_server.port}"
    # a long grace period: on a loaded machine a 2 s one let a worker fail a trial that was still training
    spec_path = write_sweep_spec(tmp_path / "sweep.yaml", study_name=study_name, n_trials=n_trials,
                                 heartbeat={"interval": 2, "grace_period": 60, "max_retry": 2},
                                 overrides=tiny_overrides(data_cache, results_dir))
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pc_lightning.cli", "sweep", str(spec_path), "--workers", "3",
             "--storage", postgres.url(), f"tracking.tracking_uri={tracking_uri}"],
            cwd=ROOT, stdout=fo, stderr=fe, env=dict(os.environ, PCL_RESULTS_DIR=str(results_dir)))
        command_lines = {}
        while proc.poll() is None:
            command_lines.update({p: c for p, c in descendants_command_lines(proc.pid).items() if c})  # not zombies
            time.sleep(0.5)
    output = out.read_text() + err.read_text()
    assert proc.returncode == 0, output
    workers = [c for c in command_lines.values() if "pc_lightning.cli sweep" in c]
    assert len(workers) == 3, command_lines
    assert not [c for c in command_lines.values() if any(s in c for s in SECRETS)], command_lines

    study = open_study(load_spec(spec_path), postgres.url())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * n_trials  # exactly n_trials, no extras

    client = mlflow_server.client(monkeypatch)
    parent = runs.find_parent(client, "study", study_name)
    assert parent.data.tags["pcl.storage"] == postgres.url().replace(PG_PASSWORD, "***")
    children = runs.children(client, parent)
    assert sorted(int(c.data.tags["pcl.trial"]) for c in children) == list(range(n_trials))
    by_number = {t.number: t for t in study.trials}
    for run in children:
        trial = by_number[int(run.data.tags["pcl.trial"])]
        assert run.info.status == "FINISHED" and trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert float(run.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert run.data.params["tracking.tracking_uri"] == f"http://alice:***@127.0.0.1:{mlflow_server.port}"
        assert "val/loss" in run.data.metrics
    # the parent's report went through the server (mlflow-artifacts:/) into its artifact root
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    report = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"optimization_history.png", "summary.md", "trials.csv", "best_params.json"} <= report
    assert list(mlflow_server.artifacts.rglob("optimization_history.png"))

    assert not [s for s in SECRETS if s in output]
    assert not files_containing(mlflow_server.root) and not files_containing(results_dir)


@pytest.mark.servers
@pytest.mark.slow
def test_ablation_on_auth_server_writes_no_password(mlflow_server, tmp_path, data_cache, results_dir, capfd,
                                                    monkeypatch):
    """An ablation whose tracking URI carries the password: its params, config.yaml artifacts, summary, CSV,
    checkpoints and output hold it redacted, the checkpoint's saved config too, and the server's files have none."""
    tracking_uri = f"http://alice:{MLFLOW_PASSWORD}@127.0.0.1:{mlflow_server.port}"
    spec = ablation_spec(tmp_path / "abl.yaml", data_cache, results_dir, **{"tracking.tracking_uri": tracking_uri})
    assert main(["ablate", str(spec)]) == 0
    output = "".join(capfd.readouterr())
    assert "ablation 'srv-abl': summary in" in output and not [s for s in SECRETS if s in output]

    client = mlflow_server.client(monkeypatch)
    children = runs.children(client, runs.find_parent(client, "ablation", "srv-abl"))
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for run in children:
        assert run.data.params["tracking.tracking_uri"] == f"http://alice:***@127.0.0.1:{mlflow_server.port}"
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
                                .read_text())
        assert config["tracking"]["tracking_uri"] == f"http://alice:***@127.0.0.1:{mlflow_server.port}"
    checkpoints = list((results_dir / "checkpoints").rglob("*.ckpt"))
    assert checkpoints
    saved = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
    assert saved["tracking"]["tracking_uri"] == f"http://alice:***@127.0.0.1:{mlflow_server.port}"
    assert (results_dir / "srv-abl" / "runs.csv").exists()
    assert not files_containing(mlflow_server.root) and not files_containing(results_dir)


# ------------------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.servers
@pytest.mark.slow
def test_sigkilled_worker_trial_is_retried_by_another_worker(postgres, mlflow_server, tmp_path, data_cache,
                                                             results_dir, monkeypatch):
    """SIGKILL one of 2 workers in the middle of its trial (no cleanup runs). Its trial is re-queued by the
    heartbeat with the same parameters and finished by the other worker; its MLflow run is closed FAILED with
    tag status=crashed and an error saying why; the study ends with exactly n_trials. Credentials come from
    PGPASSWORD and MLFLOW_TRACKING_USERNAME/PASSWORD; neither URL holds a password."""
    n_trials, study_name = 3, "srv-kill"
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    overrides = tiny_overrides(data_cache, results_dir, **{"trainer.max_steps": 60, "trainer.val_every": 20})
    spec_path = write_sweep_spec(tmp_path / "sweep.yaml", study_name=study_name, n_trials=n_trials,
                                 heartbeat={"interval": 1, "grace_period": 15, "max_retry": 2}, overrides=overrides)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pc_lightning.cli", "sweep", str(spec_path), "--workers", "2", "--storage",
         postgres.url(password=False), f"tracking.tracking_uri={mlflow_server.uri}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PCL_RESULTS_DIR=str(results_dir)))

    client = mlflow_server.client(monkeypatch)  # the admin's view, for the test's own queries
    victim, deadline = None, time.monotonic() + 600
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        parent = runs.find_parent(client, "study", study_name)
        for run in runs.children(client, parent) if parent else []:
            # a trial in the middle of training: its first checkpoint (step 3 of 60) is on disk
            ckpts = results_dir / "checkpoints" / f"{study_name}-trial{run.data.tags['pcl.trial']}" / run.info.run_id
            if run.info.status == "RUNNING" and list(ckpts.glob("*.ckpt")):
                victim = run
                break
    assert victim is not None, "no trial was seen training"
    os.kill(int(victim.data.tags["pcl.worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    output, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, output
    assert f"{n_trials}/{n_trials} trials finished" in output

    study = open_study(load_spec(spec_path), postgres.url(password=False))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == n_trials and states.count(TrialState.FAIL) == 1, states
    killed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert killed.number == int(victim.data.tags["pcl.trial"])
    retry = next(t for t in study.trials
                 if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params

    children = runs.children(client, runs.find_parent(client, "study", study_name))
    crashed = client.get_run(victim.info.run_id)
    assert crashed.info.status == "FAILED" and crashed.data.tags["status"] == "crashed"
    assert "heartbeat" in crashed.data.tags["error"]
    assert not [c for c in children if c.info.status == "RUNNING"]
    finished_runs = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(int(c.data.tags["pcl.trial"]) for c in finished_runs) == sorted(
        t.number for t in study.trials if t.state == TrialState.COMPLETE)
    rerun = next(c for c in finished_runs if c.data.tags["pcl.trial"] == str(retry.number))
    assert rerun.data.tags["pcl.worker"] != victim.data.tags["pcl.worker"]  # finished by the other worker


class ServerOutage(L.Callback):
    """Kills the MLflow server after optimizer step ``down_at`` and starts it again after step ``up_at``, once
    ``seconds`` have passed; the steps in between run while it is down."""

    def __init__(self, server, down_at: int, up_at: int, seconds: float):
        self.server, self.down_at, self.up_at, self.seconds = server, down_at, up_at, seconds
        self.stopped_at: float | None = None
        self.steps_while_down: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        step = trainer.global_step
        if step == self.down_at:
            self.server.stop(signal.SIGKILL)
            self.stopped_at = time.monotonic()
        elif self.down_at < step < self.up_at:
            self.steps_while_down.append(step)
            time.sleep(0.3)
        elif step == self.up_at:
            self.steps_while_down.append(step)
            time.sleep(max(0.0, self.stopped_at + self.seconds - time.monotonic()))
            self.server.start()


@pytest.mark.servers
@pytest.mark.slow
def test_mlflow_server_outage_during_training(tmp_path, tiny_cfg, capfd):
    """The server is killed at step 4 and back ~20 s later at step 10: training goes on meanwhile (with
    synchronous logging it would wait inside MLflow's retries and never reach step 10), the metrics logged while
    it was down are retried in the background and arrive, and the run ends FINISHED with its final metrics."""
    from servers import MlflowServer

    from pc_lightning.train import train

    server = MlflowServer(tmp_path / "mlflow")
    try:
        cfg = tiny_cfg(**{"trainer.max_steps": 16, "trainer.log_every": 1, "trainer.val_every": 8,
                          "tracking.tracking_uri": server.uri})
        outage = ServerOutage(server, down_at=4, up_at=10, seconds=20)
        result = train(cfg, extra_callbacks=[outage])
        assert outage.steps_while_down == list(range(5, 11))
        assert result.status == "finished" and result.step == 16

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val/loss"] == pytest.approx(result.metrics["val/loss"])
        logged = {m.step for m in client.get_metric_history(result.run_id, "train/loss")}
        assert set(range(4, 16)) <= logged  # incl. the steps logged while the server was down
    finally:
        server.stop()


@pytest.mark.servers
@pytest.mark.slow
def test_postgres_restart_during_sweep(tmp_path, data_cache, results_dir, monkeypatch, capfd):
    """PostgreSQL dies (immediate stop) while trial 1 trains and is back 3 s later. The worker's heartbeat and
    its report at the next validation wait for it and reconnect: the sweep ends with n_trials COMPLETE and no
    FAIL; running the same command again repeats nothing."""
    from servers import PostgresServer

    import pc_lightning.sweep.study as study_module

    pg = PostgresServer(PG_PASSWORD)
    try:
        spec_path = write_sweep_spec(
            tmp_path / "sweep.yaml", study_name="srv-pg-restart", n_trials=3, storage=pg.url(),
            heartbeat={"interval": 1, "grace_period": 30, "max_retry": 2},
            overrides=tiny_overrides(data_cache, results_dir, **{"trainer.max_steps": 9, "trainer.val_every": 3}))
        restarts = []

        class RestartDatabase(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step == 2 and not restarts:
                    pg.stop("immediate")  # now: the heartbeat and the report at step 3 find it down
                    restarts.append(threading.Timer(3.0, pg.start))
                    restarts[0].start()

        def train_with_restart(cfg, extra_callbacks=None, **kwargs):
            extra = [RestartDatabase()] if cfg.name.endswith("trial1") else []
            return train(cfg, extra_callbacks=list(extra_callbacks or []) + extra, **kwargs)

        train = study_module.train
        monkeypatch.setattr(study_module, "train", train_with_restart)
        assert study_module.run_sweep(str(spec_path)) == 0
        restarts[0].join()
        err = capfd.readouterr().err
        assert "unreachable" in err and PG_PASSWORD not in err

        study = open_study(load_spec(spec_path), pg.url())
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        values = [t.value for t in study.trials]
        assert study_module.run_sweep(str(spec_path)) == 0  # nothing lost, nothing repeated
        study = open_study(load_spec(spec_path), pg.url())
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        assert [t.value for t in study.trials] == values
    finally:
        pg.close()
