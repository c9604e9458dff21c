"""Keeps the MLflow run id inside every checkpoint, so ``--resume`` continues the same MLflow run."""

from __future__ import annotations

import lightning as L


class MlflowRunInCheckpoint(L.Callback):
    def __init__(self, run_id: str):
        self.run_id = run_id

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.run_id
