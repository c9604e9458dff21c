"""MLflow tracking defaults: a SQLite file under results/ unless a tracking URI is configured, and the one
MLflow client the suite writes through.

MLflow 3 refuses the old ``./mlruns`` file store, and Lightning's ``MLFlowLogger`` reads
``MLFLOW_TRACKING_URI`` at import time, so we always pass the URI explicitly.

Every call of the client returned by :func:`client` completes before a Ctrl-C is raised
(:mod:`pc_lightning.held_interrupt`): an interrupt that landed inside an MLflow SQLite write could leave its
transaction open and every later write, the one closing the run included, failed with "database is locked".
MLflow itself gives each SQLite session a busy timeout (``PRAGMA busy_timeout = 20000`` in MLflow 3.17), so
writers of several processes wait for each other instead of failing.

A tracking server (``http(s)://``) is checked once before anything else runs (:func:`check_server`): one
request with a short timeout and no retries, so a server that is down or refuses the credentials stops the
command in seconds with one line, instead of after MLflow's ~4 minutes of retries and the data preparation.
Credentials written into the URI (``http://user:pw@host``) are moved into ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` of this process (and so of its children), and MLflow gets the URI without them:
MLflow's own messages then never show the password.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from pc_lightning.config import ConfigError, TrackingConfig, results_root
from pc_lightning.held_interrupt import HeldInterrupt
from pc_lightning.library_noise import silence_library_noise
from pc_lightning.secrets import redact, split_credentials

RESULTS_DIR = results_root()


# the start-up check's one request: a host that does not accept the connection within CONNECT_TIMEOUT_S is
# down; a busy server may take longer to answer (training itself keeps MLflow's own timeouts and retries)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 60


def tracking_uri(cfg: TrackingConfig) -> str:
    """The URI MLflow gets: the configured one (credentials moved to the environment), or the SQLite default."""
    if cfg.tracking_uri:
        return server_credentials_to_env(cfg.tracking_uri)
    return f"sqlite:///{(RESULTS_DIR / 'mlflow.db').resolve()}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_credentials_to_env(uri: str) -> str:
    """``http://user:pw@host`` -> ``http://host``, with user and password set as MLflow's credential variables."""
    if not is_server(uri):
        return uri
    bare, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return bare


def check_server(cfg: TrackingConfig) -> None:
    """For a tracking server: one authenticated request (no retries, short timeouts), or a ConfigError that
    names the URI (password redacted) and what is wrong. Nothing to check for a local store."""
    uri = tracking_uri(cfg)
    if not is_server(uri):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = redact(cfg.tracking_uri)
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                params={"max_results": 1}, max_retries=0, backoff_factor=0, backoff_jitter=0,
                                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), raise_on_status=False)
    except MlflowException as e:
        raise ConfigError("tracking.tracking_uri", f"cannot reach the MLflow tracking server at {shown} "
                                                   f"({_reason(e)}); start it or fix the URI") from None
    if response.status_code in (401, 403):
        raise ConfigError("tracking.tracking_uri", f"the MLflow tracking server at {shown} refused the "
                                                   f"credentials (HTTP {response.status_code}); set "
                                                   "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if response.status_code != 200:
        raise ConfigError("tracking.tracking_uri", f"{shown} did not answer as an MLflow tracking server (HTTP "
                                                   f"{response.status_code} for /api/2.0/mlflow/experiments/search)")


def _reason(error: Exception) -> str:
    """The short cause of a failed request ("[Errno 111] Connection refused", "timed out"), password-free."""
    text = str(error)
    if "ConnectTimeout" in text or "connect timeout" in text:
        return f"no connection within {CONNECT_TIMEOUT_S} s"
    if "ReadTimeout" in text or "Read timed out" in text:
        return f"no answer within {READ_TIMEOUT_S} s"
    for pattern in (r"\[Errno -?\d+\] [^'\")\]]+", r"Name or service not known"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return redact(text.splitlines()[0] if text else type(error).__name__)[:200]


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

    uri = server_credentials_to_env(cfg_or_uri) if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    ensure_results_dir(uri)
    silence_library_noise()  # MLflow's schema-creation lines
    return HeldClient(MlflowClient(uri))


def get_or_create_experiment(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
