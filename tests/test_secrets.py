"""Passwords in URLs and ``password=`` pairs are redacted by one function (pc_lightning/secrets.py); the
credentials of a tracking URI move to MLflow's variables. (The end-to-end checks that no record holds a
password run against real servers in test_servers.py.)"""

from __future__ import annotations

import pytest

from pc_lightning import tracking
from pc_lightning.config import TrackingConfig
from pc_lightning.secrets import redact, redact_tree, split_credentials, without_masked_password


@pytest.mark.parametrize("text, expected", [
    ("postgresql://user:pw@db-host/optuna", "postgresql://user:***@db-host/optuna"),
    ("postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require", "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    ("pcl: cannot reach http://alice:s3cret@127.0.0.1:9/ (refused)",
     "pcl: cannot reach http://alice:***@127.0.0.1:9/ (refused)"),
    ("host=db user=pcl password=s3cret dbname=optuna", "host=db user=pcl password=*** dbname=optuna"),
    ("https://h/data.txt?token=1&Password=s3cret", "https://h/data.txt?token=1&Password=***"),
    ("postgresql://user@db-host/optuna", "postgresql://user@db-host/optuna"),  # no password: unchanged
    ("sqlite:////tmp/results/optuna.db", "sqlite:////tmp/results/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_tree_and_mask_removal():
    config = {"tracking": {"tracking_uri": "http://a:pw@h:5000"}, "data": {"data_files": ["https://u:pw@h/x.txt"]},
              "optim": {"lr": 0.1}}
    assert redact_tree(config) == {"tracking": {"tracking_uri": "http://a:***@h:5000"},
                                   "data": {"data_files": ["https://u:***@h/x.txt"]}, "optim": {"lr": 0.1}}
    assert without_masked_password("postgresql://pcl:***@db/optuna") == "postgresql://pcl@db/optuna"
    assert split_credentials("http://alice:p%40ss@h:5000/x") == ("http://h:5000/x", "alice", "p@ss")


def test_tracking_uri_credentials_move_to_mlflow_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert tracking.tracking_uri(TrackingConfig(tracking_uri="http://alice:s3cret@mlflow-host:5000")) == \
        "http://mlflow-host:5000"
    import os

    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret")
