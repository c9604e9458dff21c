"""Small Lightning callbacks the tests share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import lightning as L


class StopAt(L.Callback):
    """Ends training after optimizer step `step`, as an interruption would (a checkpoint is due there)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
