"""Serialise "count the budget, then start a trial" among the sweep workers of one machine.

Two workers that count the study's trials at the same moment both see room for one more trial and both start
one: a 4-trial study ends with 5. :func:`pc_lightning.sweep.study.work` therefore takes this lock before it
counts and releases it as soon as its new trial is RUNNING in the storage (first line of the objective), so the
next worker's count includes that trial. It is an exclusive ``fcntl.flock`` on a file next to a SQLite or
journal storage file, which is what ``--workers N`` on one machine uses. Workers on several machines sharing a
PostgreSQL storage are not serialised by it; there the study may end with up to workers − 1 extra trials.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from pc_lightning.sweep.space import is_journal


def lock_path(url: str) -> Path | None:
    """``<storage file>.start.lock`` for ``sqlite:///path`` and journal-file storages, else None."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):] + ".start.lock")
    if is_journal(url):
        return Path(url + ".start.lock")
    return None


class StartLock:
    def __init__(self, url: str):
        self.path = lock_path(url)
        self._file: IO | None = None

    def acquire(self) -> None:
        if self.path is not None and self._file is None:
            self._file = open(self.path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        """Idempotent: the objective releases it, and the worker loop again after the trial."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
