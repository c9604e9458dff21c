"""Serialise "count the budget, then start a trial" among the sweep workers of one study.

Two workers that count the study's trials at the same moment both see room for one more trial and both start
one: a 4-trial study ends with 5. :func:`pc_lightning.sweep.study.work` therefore takes this lock before it
counts and releases it as soon as its new trial is RUNNING in the storage (first line of the objective), so the
next worker's count includes that trial. The lock lives where the workers meet:

* SQLite or journal storage (``--workers N`` on one machine): an exclusive ``fcntl.flock`` on
  ``<storage file>.start.lock``.
* PostgreSQL storage (workers on one or several machines): a PostgreSQL session-level advisory lock
  (``pg_advisory_lock``) keyed by the study name, on a connection of its own. A worker that dies while it
  holds the lock loses its connection, and the server releases the lock with it.

Other RDB storages (MySQL, ...) are not serialised: there the study may end with up to workers − 1 extra trials.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from pathlib import Path
from typing import IO

from optuna.exceptions import StorageInternalError

from pc_lightning.sweep.space import is_journal
from pc_lightning.sweep.storage import RETRY_SECONDS


def lock_path(url: str) -> Path | None:
    """``<storage file>.start.lock`` for ``sqlite:///path`` and journal-file storages, else None."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):] + ".start.lock")
    if is_journal(url):
        return Path(url + ".start.lock")
    return None


def advisory_key(study_name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` (the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(f"pcl-start:{study_name}".encode()).digest()[:8], "big", signed=True)


class StartLock:
    def __init__(self, url: str, study_name: str = ""):
        self.path = lock_path(url)
        self._file: IO | None = None
        self._url = url if url.startswith("postgresql") else None
        self._key = advisory_key(study_name)
        self._engine = None
        self._conn = None

    def acquire(self) -> None:
        if self.path is not None and self._file is None:
            self._file = open(self.path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)
        if self._url is not None and self._conn is None:
            import sqlalchemy

            if self._engine is None:  # no pool: closing the connection ends the session (and any lock it held)
                self._engine = sqlalchemy.create_engine(self._url, poolclass=sqlalchemy.pool.NullPool)
            deadline, pause = time.monotonic() + RETRY_SECONDS, 0.5
            while True:  # the database may be restarting: wait for it as the storage does
                try:
                    conn = self._engine.connect()
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
                    self._conn = conn
                    return
                except sqlalchemy.exc.OperationalError as e:
                    if time.monotonic() + pause > deadline:
                        raise StorageInternalError("the start lock's connection failed") from e
                    time.sleep(pause)
                    pause = min(2 * pause, 10.0)

    def release(self) -> None:
        """Idempotent: the objective releases it, and the worker loop again after the trial."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            import sqlalchemy

            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            except sqlalchemy.exc.DBAPIError:
                pass  # the connection is gone (database restarted): the server dropped the lock with it
            finally:
                try:
                    conn.close()
                except sqlalchemy.exc.DBAPIError:
                    pass
