"""The life of an MLflow run: created or reopened, and closed exactly once with one :class:`RunStatus`.

Every run the suite records goes through :class:`TrackedRun`: a training run (:func:`pc_lightning.train.train`),
the parent run of a study or an ablation (:func:`pc_lightning.sweep.runs.find_or_create_parent`), and a sweep
trial's run left RUNNING by a killed worker (closed as ``crashed`` by the worker that retries the trial). Used
as a context manager it closes the run however the block ends:

==========================  ===========  ==============  =================================================
how the block ends          ``status``   MLflow status   also tagged
==========================  ===========  ==============  =================================================
normally                    finished     FINISHED        (or the outcome set by :meth:`TrackedRun.finish`)
non-finite/blown-up loss    diverged     FAILED          ``diverged_message``
exception                   failed       FAILED          ``error`` (type and message)
Ctrl-C, SIGTERM, exit       killed       KILLED
pruned by Optuna            pruned       KILLED
(killed worker, retried)    crashed      FAILED
==========================  ===========  ==============  =================================================

The table is :data:`MLFLOW_STATUS`; the ``status`` tag is the :class:`RunStatus` value. An exception decides
its own status through a ``run_status`` attribute (:class:`pc_lightning.sweep.pruning.Pruned`); a diverged
training run is an outcome, not an exception (:meth:`TrackedRun.finish`). Lightning's logger does not close the run
(:class:`RunLogger`), so no other code sets a run's status. Every write goes through
:func:`pc_lightning.tracking.client`, so a Ctrl-C never lands inside one (:mod:`pc_lightning.held_interrupt`).
"""

from __future__ import annotations

import enum
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from pc_lightning import tracking
from pc_lightning.held_interrupt import HeldInterrupt
from pc_lightning.secrets import redact

RUNNING = "RUNNING"  # MLflow's status of an open run


class RunStatus(enum.StrEnum):
    FINISHED = "finished"
    FAILED = "failed"
    KILLED = "killed"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    CRASHED = "crashed"  # its worker process died before closing it (a sweep trial: retried under a new run)

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS[self]

    @classmethod
    def of(cls, run) -> RunStatus | None:
        """The status of an ended MLflow run: its ``status`` tag, else its MLflow status; None while it runs (a
        reopened run keeps the tag of its previous ending until it ends again)."""
        if run.info.status == RUNNING:
            return None
        tag = run.data.tags.get("status")
        if tag in {status.value for status in cls}:
            return cls(tag)
        return {"FINISHED": cls.FINISHED, "FAILED": cls.FAILED, "KILLED": cls.KILLED}.get(run.info.status)

    @classmethod
    def of_exception(cls, error: BaseException) -> RunStatus:
        declared = getattr(error, "run_status", None)
        if declared is not None:
            return cls(declared)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):  # Ctrl-C; SIGTERM (Lightning's SIGTERMException)
            return cls.KILLED
        return cls.FAILED


# The one table from the suite's statuses to MLflow's terminal statuses.
MLFLOW_STATUS: dict[RunStatus, str] = {
    RunStatus.FINISHED: "FINISHED",
    RunStatus.FAILED: "FAILED",
    RunStatus.KILLED: "KILLED",
    RunStatus.DIVERGED: "FAILED",
    RunStatus.PRUNED: "KILLED",
    RunStatus.CRASHED: "FAILED",
}


class TrackedRun:
    """An open MLflow run, closed once: by :meth:`close`, or on leaving the ``with`` block (see the module
    docstring)."""

    def __init__(self, mlflow_client, run_id: str, reopened: bool = False, previous: RunStatus | None = None):
        self.client, self.run_id = mlflow_client, run_id
        self.reopened = reopened  # an existing run continued (a resume), not a new one
        self.previous = previous  # how a reopened run had ended before (None: it was still RUNNING)
        self.closed = False
        self._outcome: tuple[RunStatus, dict[str, str]] = (RunStatus.FINISHED, {})

    @classmethod
    def create(cls, mlflow_client, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> TrackedRun:
        """A new RUNNING run, with MLflow's context tags (user, source) as Lightning's logger would add them."""
        from mlflow.tracking.context.registry import resolve_tags

        experiment_id = tracking.get_or_create_experiment(mlflow_client, experiment, uri)
        run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags))
        return cls(mlflow_client, run.info.run_id)

    @classmethod
    def reopen(cls, mlflow_client, run_id: str) -> TrackedRun:
        """An existing run (a resumed training run, a study's or ablation's parent), RUNNING again."""
        previous = RunStatus.of(mlflow_client.get_run(run_id))
        if previous is not None:
            mlflow_client.update_run(run_id, status=RUNNING)
        return cls(mlflow_client, run_id, reopened=True, previous=previous)

    def finish(self, status: RunStatus = RunStatus.FINISHED, **tags: str) -> None:
        """The status (and tags) the run closes with if the ``with`` block ends without an exception."""
        self._outcome = (RunStatus(status), tags)

    def restore_previous_status(self) -> None:
        """Close a reopened run as it had ended before (failed if it had not ended): for a resume that could not
        start, whose run records no new training."""
        self.close(self.previous or RunStatus.FAILED)

    def close(self, status: RunStatus, **tags: str) -> None:
        """Tag the run ``status=<status>`` (plus ``tags``) and end it with MLflow's status for it. Once only; a
        Ctrl-C meanwhile is raised once the run is closed."""
        if self.closed:
            return
        self.closed = True
        status = RunStatus(status)
        with HeldInterrupt():
            for key, value in {"status": status.value, **tags}.items():
                self.client.set_tag(self.run_id, key, value)
            self.client.set_terminated(self.run_id, status.mlflow_status)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, error: BaseException | None, tb) -> None:
        if error is None:
            status, tags = self._outcome
            self.close(status, **tags)
            return
        status = RunStatus.of_exception(error)
        message = redact(f"{type(error).__name__}: {error}")[:5000]  # no password of a URL in the tag
        self.close(status, **({"error": message} if status == RunStatus.FAILED else {}))

    def logger(self, **kwargs: Any) -> RunLogger:
        """Lightning's MLflow logger writing to this run (``kwargs``: tracking_uri, experiment_name, ...)."""
        return RunLogger(self.client, run_id=self.run_id, **kwargs)


class RunLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` on an existing run, writing through the suite's client, and leaving the
    run's status to its :class:`TrackedRun` (Lightning would end it FINISHED or FAILED itself)."""

    def __init__(self, mlflow_client, **kwargs: Any):
        super().__init__(**kwargs)
        self._mlflow_client = mlflow_client

    def finalize(self, status: str = "success") -> None:
        pass
