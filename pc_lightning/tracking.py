"""MLflow tracking defaults: a SQLite file under results/ unless a tracking URI is configured.

MLflow 3 refuses the old ``./mlruns`` file store, and Lightning's ``MLFlowLogger`` reads
``MLFLOW_TRACKING_URI`` at import time, so we always pass the URI explicitly (DESIGN.md section 7).
"""

from __future__ import annotations

import os
from pathlib import Path

from pc_lightning.config import TrackingConfig

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


def client(cfg_or_uri: TrackingConfig | str):
    from mlflow.tracking import MlflowClient

    uri = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    ensure_results_dir(uri)
    return MlflowClient(uri)


def get_or_create_experiment(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
