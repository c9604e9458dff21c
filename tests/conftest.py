"""Shared test fixtures: tiny configs, one prepared-data cache per session, results in a temp dir.

Tests run real parts at tiny sizes: the bundled corpus, a real BPE tokenizer, SQLite MLflow/Optuna files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pc_lightning.sweep.workers import threads_per_worker

# One pytest process takes up to 2 cores; under pytest-xdist (`-n N`) the N workers share the cores as `pcl`'s own
# workers do (oversubscribed torch threads slow every worker down several-fold).
torch.set_num_threads(min(2, threads_per_worker(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One prepared bible cache shared by every test (BPE 512 keeps it fast)."""
    return str(tmp_path_factory.mktemp("pcl-data"))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once per session: creating the schema (MLflow's alembic migrations)
    takes seconds, and most tests start from an empty store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def results_dir(tmp_path, monkeypatch, mlflow_template):
    """Send MLflow/Optuna files and checkpoints of a test to its own temp dir (``tracking.RESULTS_DIR`` and
    ``$PCL_RESULTS_DIR``, which the ``trainer.checkpoint_dir`` default and child processes read). The test's MLflow
    store starts as a copy of the session's migrated empty store, made when the suite first opens it (the same moment
    MLflow would create it), so a test that checks no store was created still sees none."""
    import pc_lightning.tracking as tracking

    ensure = tracking.ensure_results_dir

    def ensure_from_template(uri: str) -> None:
        ensure(uri)
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.exists():
            shutil.copyfile(mlflow_template, db)

    monkeypatch.setattr(tracking, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setenv("PCL_RESULTS_DIR", str(tmp_path / "results"))  # trainer.checkpoint_dir's default, subprocesses
    monkeypatch.setattr(tracking, "ensure_results_dir", ensure_from_template)
    return tmp_path / "results"


def tiny_overrides(data_cache: str, results_dir, **extra) -> list[str]:
    """Overrides that make conf/baseline.yaml a seconds-long run."""
    items = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64, "model.max_seq_len": 64,
        "data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 4, "data.val_batches": 2,
        "data.cache_dir": data_cache, "trainer.max_steps": 6, "trainer.val_every": 3, "trainer.log_every": 2,
        "trainer.checkpoint_every": 3, "trainer.checkpoint_dir": str(results_dir / "checkpoints"),
        "trainer.progress_bar": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture()
def tiny_cfg(data_cache, results_dir):
    """A factory: tiny_cfg(**overrides) -> validated ExperimentConfig built from conf/baseline.yaml."""
    from pc_lightning.config import load_config

    root = os.path.dirname(os.path.dirname(__file__))

    def make(**extra):
        return load_config(os.path.join(root, "conf", "baseline.yaml"), tiny_overrides(data_cache, results_dir, **extra))

    return make


# Passwords of the real servers of the tests marked `servers` (tests/servers.py); the tests check that none of
# them is written anywhere. MLflow's basic-auth app wants at least 12 characters.
PG_PASSWORD = "pg-Secret-7f3a9c"
MLFLOW_ADMIN_PASSWORD = "mlflow-Admin-4d1e8b"
MLFLOW_PASSWORD = "mlflow-Alice-9b2c6d"


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the whole test run: user 'pcl' with PG_PASSWORD, database 'optuna'."""
    from servers import PostgresServer

    server = PostgresServer(PG_PASSWORD)
    yield server
    server.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """An ``mlflow server`` with the basic-auth app on 127.0.0.1 for the whole test run (SQLite backend, artifacts
    served through the server); user 'alice' with MLFLOW_PASSWORD, admin with MLFLOW_ADMIN_PASSWORD."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), auth_admin_password=MLFLOW_ADMIN_PASSWORD)
    server.create_user("alice", MLFLOW_PASSWORD)
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``) the tests marked ``servers`` run on one worker, so the session's
    PostgreSQL and MLflow servers start once, as in a serial run."""
    for item in items:
        if item.get_closest_marker("servers"):
            item.add_marker(pytest.mark.xdist_group("servers"))
