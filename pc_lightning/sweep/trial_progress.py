"""The progress display of a study (``pcl sweep``), on :mod:`pc_lightning.progress`: a line for every trial
finished (completed or pruned, by any worker of the study, seen when this process runs its own trials or
polls the storage while its ``--workers`` run), and the step of the trial this process trains.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from pc_lightning.progress import Progress, StepProgress
from pc_lightning.sweep.space import SweepSpec


class TrialProgress:
    """See the module docstring; ``steps`` is the callback that joins this process's trials."""

    CURRENT = "trial in progress"

    def __init__(self, study: optuna.Study, spec: SweepSpec, n_trials: int):
        self.study, self.metric = study, spec.objective.metric
        self.seen = {t.number for t in self._finished()}
        self.progress = Progress(f"sweep '{spec.study_name}'", total=n_trials, done=len(self.seen))
        self.steps = StepProgress(lambda step, max_steps: self.progress.step(self.CURRENT, step, max_steps))

    def _finished(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))

    def describe(self, trial: FrozenTrial) -> str:
        if trial.state == TrialState.PRUNED:
            outcome = f"pruned at step {trial.last_step}"
        elif trial.user_attrs.get("diverged"):
            outcome = f"diverged (counts as {self.metric}={trial.value:.4f})"
        else:
            outcome = f"{self.metric}={trial.value:.4f}"
        if trial.datetime_start and trial.datetime_complete:
            outcome += f" ({(trial.datetime_complete - trial.datetime_start).total_seconds():.0f}s)"
        return outcome

    def poll(self) -> None:
        """A line for every trial finished since the last poll."""
        for trial in sorted(self._finished(), key=lambda t: t.datetime_complete or t.datetime_start):
            if trial.number not in self.seen:
                self.seen.add(trial.number)
                self.progress.finished(f"trial {trial.number}", self.describe(trial), done=len(self.seen))

    def trial_ended(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after each trial of this process."""
        self.progress.running.pop(self.CURRENT, None)
        self.poll()

    def __enter__(self) -> TrialProgress:
        self.progress.__enter__()
        self.progress.message(f"{self.progress.label}: {self.progress.total} trials, {len(self.seen)} already "
                              "finished")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()
