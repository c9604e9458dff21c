"""An Optuna RDB storage that rides through a restart of its database server.

Workers share one database (PostgreSQL for several machines). When that server restarts, Optuna's plain
:class:`optuna.storages.RDBStorage` loses the sweep in three ways: every pooled connection is dead, so the next
call fails even after the server is back; a failed heartbeat ends the trial's heartbeat thread (Optuna records
heartbeats in a loop with no error handling), so after ``heartbeat.grace_period`` another worker fails and
re-runs a trial that is still training; and any storage call made while the server is down fails the trial.
:class:`ReconnectingRDBStorage` therefore

* checks each pooled connection before use (SQLAlchemy ``pool_pre_ping``) and replaces dead ones;
* skips a heartbeat that cannot be recorded (one warning), so the heartbeat thread lives on and beats again
  once the server answers; only a server away for longer than the grace period lets the trial be retried;
* retries the calls a worker makes (reads, trial creation, reports, attributes, the final state) while the
  failure is a lost connection, with backoff for up to ``RETRY_SECONDS``; after that the error goes up, and
  :func:`pc_lightning.sweep.study.run_sweep` stops with one line (running the same command resumes).

A server that cannot be reached when the storage is opened is a :class:`~pc_lightning.config.ConfigError`
naming the URL (password redacted).
"""

from __future__ import annotations

import functools
import sys
import time

import optuna
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError

from pc_lightning.config import ConfigError
from pc_lightning.secrets import redact

RETRY_SECONDS = 120.0  # how long a storage call waits for the database to come back
_RETRIED = ("get_all_trials", "get_trial", "get_n_trials", "get_study_id_from_name", "get_study_directions",
            "get_study_user_attrs", "get_study_system_attrs", "get_trial_id_from_study_id_trial_number",
            "create_new_trial", "set_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
            "set_trial_system_attr", "set_trial_state_values", "_get_stale_trial_ids")


def is_connection_error(error: BaseException) -> bool:
    """A failure of the connection to the database (server down, restarted, unreachable), not of a query."""
    cause = error.__cause__ if isinstance(error, StorageInternalError) else error
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
        isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated)


def describe(error: BaseException) -> str:
    """The first line of the database's own message (e.g. 'connection to server ... failed: Connection refused')."""
    cause = error.__cause__ if isinstance(error, StorageInternalError) and error.__cause__ else error
    if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return redact(lines[0] if lines else type(cause).__name__)


def _retrying(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline, pause = time.monotonic() + RETRY_SECONDS, 0.5
        while True:
            try:
                result = method(self, *args, **kwargs)
                self._warned = False
                return result
            except StorageInternalError as e:
                if not is_connection_error(e) or time.monotonic() + pause > deadline:
                    raise
                self._warn(f"the Optuna storage {redact(self.url)} is unreachable ({describe(e)}); retrying for "
                           f"up to {RETRY_SECONDS:.0f} s")
                time.sleep(pause)
                pause = min(2 * pause, 10.0)

    return call


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    def __init__(self, url: str, engine_kwargs: dict | None = None, **kwargs):
        engine_kwargs = {"pool_pre_ping": True, **(engine_kwargs or {})}
        self._warned = False
        try:
            super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, StorageInternalError) as e:
            raise ConfigError("--storage", f"cannot connect to the Optuna storage {redact(url)}: {describe(e)}") \
                from None

    def _warn(self, message: str) -> None:
        if not self._warned:  # once per outage: the next successful call re-arms it
            self._warned = True
            print(f"pcl: warning: {message}", file=sys.stderr)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
            self._warned = False
        except StorageInternalError as e:
            if not is_connection_error(e):
                raise
            self._warn(f"heartbeat of trial id {trial_id} not recorded: the Optuna storage {redact(self.url)} is "
                       f"unreachable ({describe(e)}); trying again every {self.heartbeat_interval} s")


for _name in _RETRIED:
    setattr(ReconnectingRDBStorage, _name, _retrying(getattr(optuna.storages.RDBStorage, _name)))
