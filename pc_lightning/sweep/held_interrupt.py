"""Hold a Ctrl-C that arrives between a trial's finished MLflow run and Optuna's record of the trial.

A sweep trial is recorded twice: :func:`pc_lightning.train.train` closes its MLflow run (FINISHED, or KILLED
for a pruned trial), then ``study.optimize`` stores the trial's user attributes and state. A SIGINT between the
two would fail the Optuna trial of a finished run, and the resumed sweep would train a replacement for a
result it already has. :func:`pc_lightning.sweep.study.work` therefore holds SIGINT from the moment training
has ended (:meth:`HeldInterrupt.hold`, called by the objective) until Optuna has told the trial
(:meth:`HeldInterrupt.release`), and then raises the ``KeyboardInterrupt`` the signal would have raised.

Python's own SIGINT handler is replaced for that span only (signals are handled in the main thread; elsewhere
this does nothing). SIGTERM is not held: outside training it ends the process, and the heartbeat retries the
trial (see :mod:`pc_lightning.sweep.study`).
"""

from __future__ import annotations

import signal
import threading


class HeldInterrupt:
    def __init__(self) -> None:
        self._previous = None  # the SIGINT handler to restore while holding, else None
        self._received = False

    def hold(self) -> None:
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        self._received = False
        self._previous = signal.signal(signal.SIGINT, self._record)

    def _record(self, signum, frame) -> None:
        self._received = True

    def release(self) -> None:
        """Restore the handler; raise KeyboardInterrupt if a SIGINT came while holding. Idempotent."""
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        if self._received:
            self._received = False
            raise KeyboardInterrupt
