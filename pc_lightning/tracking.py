"""MLflow tracking defaults: a SQLite file under results/ unless a tracking URI is configured, and the one
MLflow client the suite writes through.

MLflow 3 refuses the old ``./mlruns`` file store, and Lightning's ``MLFlowLogger`` reads
``MLFLOW_TRACKING_URI`` at import time, so we always pass the URI explicitly.

Every call of the client returned by :func:`client` completes before a Ctrl-C is raised
(:mod:`pc_lightning.held_interrupt`): an interrupt that landed inside an MLflow SQLite write could leave its
transaction open and every later write, the one closing the run included, failed with "database is locked".
MLflow itself gives each SQLite session a busy timeout (``PRAGMA busy_timeout = 20000`` in MLflow 3.17), so
writers of several processes wait for each other instead of failing.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pc_lightning.config import TrackingConfig
from pc_lightning.held_interrupt import HeldInterrupt

RESULTS_DIR = Path(os.environ.get("PCL_RESULTS_DIR", "results"))


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(RESULTS_DIR / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside the SQLite file (a server URI keeps its own artifact store)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_results_dir(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


class HeldClient:
    """An ``MlflowClient`` whose every method call runs with SIGINT held (see the module docstring)."""

    def __init__(self, mlflow_client):
        self._client = mlflow_client

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_client":  # copy/pickle probe these before _client is set
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def held(*args, **kwargs):
            with HeldInterrupt():
                return attr(*args, **kwargs)

        return held


def client(cfg_or_uri: TrackingConfig | str) -> HeldClient:
    from mlflow.tracking import MlflowClient

    uri = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    ensure_results_dir(uri)
    return HeldClient(MlflowClient(uri))


def get_or_create_experiment(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
