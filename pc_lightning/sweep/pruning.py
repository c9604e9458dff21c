"""Optuna pruning for pre-training: report the objective at every validation, keyed by optimizer step.

Written instead of using ``optuna_integration.PyTorchLightningPruningCallback`` because that callback
reports once per *epoch* with the epoch number as the step; pre-training runs a single long epoch and
validates every ``trainer.val_every`` optimizer steps, so the pruner would see one point per trial at
best. Here each validation reports ``(value, trainer.global_step)``, so the median/Hyperband pruners
compare trials at the same number of optimizer steps (docs/sweeps.md).

Under DDP/FSDP every rank runs this callback with an ``optuna_integration.TorchDistributedTrial`` (see
:mod:`pc_lightning.sweep.study`): rank 0's value is broadcast first, so all ranks take the same branch,
``report`` reaches Optuna from rank 0 only, and ``should_prune()`` is broadcast, so all ranks stop together
instead of one waiting in a collective for the others.

A pruned trial raises :class:`Pruned` (an ``optuna.TrialPruned``, so Optuna records the trial PRUNED); its
training run closes with status ``pruned`` (:mod:`pc_lightning.tracked_run`).
"""

from __future__ import annotations

import math

import lightning as L
import optuna

from pc_lightning.tracked_run import RunStatus


class Pruned(optuna.TrialPruned):
    run_status = RunStatus.PRUNED


class OptunaPruning(L.Callback):
    def __init__(self, trial: optuna.trial.BaseTrial, metric: str = "val/loss"):
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        value = trainer.strategy.broadcast(None if value is None else float(value))  # rank 0's, on every rank
        if value is None or not math.isfinite(value):  # divergence is handled by the run itself, not the pruner
            return
        step = trainer.global_step
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number} pruned at step {step} ({self.metric}={value:.4f})")
