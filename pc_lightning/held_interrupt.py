"""Hold a Ctrl-C while a record is being written, and raise it once the record is complete.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT arrives. Inside a
tracking write that can be half-way through a database session: an MLflow write to a SQLite file interrupted
there left its transaction open, the cleanup that should have marked the run KILLED then failed with
``sqlite3.OperationalError: database is locked``, and the run stayed RUNNING. So every record the suite writes
is written with SIGINT held:

* every MLflow call goes through :func:`pc_lightning.tracking.client`, whose calls each run under a hold
  (the Lightning logger and :class:`~pc_lightning.tracked_run.TrackedRun` use that client);
* a sweep holds SIGINT from the end of a trial's training until Optuna has recorded the trial
  (:func:`pc_lightning.sweep.study.work`), so a finished run never becomes a failed trial.

While a hold is on, SIGINT only sets a flag; when the outermost hold ends, the handler that was installed
before is restored and called, which for Python's default handler raises the ``KeyboardInterrupt``. Holds
nest (one per :class:`HeldInterrupt`), and a second SIGINT during a hold is delivered at once, so that a
write that hangs (e.g. a tracking server that does not answer) can still be interrupted. Only a Python
handler is held: under ``SIG_DFL`` or ``SIG_IGN`` nothing is raised inside the process, so there is nothing
to hold. Signals are handled in the main thread only; in other threads a hold does nothing. SIGTERM is not
held: Lightning's handler only sets a flag that training checks at a safe point, and without Lightning's
handler SIGTERM ends the process (a killed process leaves no SQLite transaction open).
"""

from __future__ import annotations

import signal
import threading

_depth = 0  # holds in force in the main thread
_previous = None  # the SIGINT handler to restore when the outermost hold ends
_pending = False  # a SIGINT arrived during the hold


def _record(signum, frame) -> None:
    global _pending
    if _pending:  # the second Ctrl-C: the user insists; raised now, and not again when the hold ends
        _pending = False
        _previous(signum, frame)
        return
    _pending = True


def _acquire() -> bool:
    global _depth, _previous, _pending
    if threading.current_thread() is not threading.main_thread():
        return False
    if _depth == 0:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIG_DFL, SIG_IGN or not set from Python: nothing is raised here
            return False
        _previous, _pending = handler, False
        signal.signal(signal.SIGINT, _record)
    _depth += 1
    return True


def _release() -> None:
    global _depth, _previous, _pending
    _depth -= 1
    if _depth > 0:
        return
    handler, received = _previous, _pending
    _previous, _pending = None, False
    signal.signal(signal.SIGINT, handler)
    if received:
        handler(signal.SIGINT, None)


class HeldInterrupt:
    """One hold of SIGINT. ``hold`` and ``release`` are idempotent; also a context manager (``with
    HeldInterrupt(): ...``). ``release`` raises the ``KeyboardInterrupt`` of a SIGINT that arrived while held
    (once the outermost hold ends)."""

    def __init__(self) -> None:
        self._holding = False

    def hold(self) -> None:
        if not self._holding:
            self._holding = _acquire()

    def release(self) -> None:
        if self._holding:
            self._holding = False
            _release()

    def __enter__(self) -> HeldInterrupt:
        self.hold()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
