"""Refresh the cached orthonormal factors of every TSVD layer after the optimizer step.

Kamali et al., arXiv 2605.28573 (docs/tsvd.md): U, V of W = U·diag(s)·Vᵀ must be orthonormal at
every forward; the layer forwards with a cached orthonormal copy, and this callback renews the cache every
``model.tsvd.refresh_every`` optimizer steps: Q = orth(U_raw), U_ortho := Q, U_raw := Q (a QR / polar
retraction, :func:`pc_lightning.layers.tsvd_linear.retract`), all same-shape factors of the model as one stack.

Logged (every ``trainer.log_every`` steps, as Lightning samples ``self.log``): ``tsvd/ortho_error`` =
max over layers of max(‖UᵀU − I‖∞, ‖VᵀV − I‖∞) after the refresh, and ``tsvd/refresh_ms``, the wall time
of one refresh of the whole model (on a logging step, with the device synchronised before and after).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from pc_lightning.config import TSVDConfig
from pc_lightning.distributed import full_parameters
from pc_lightning.layers.tsvd_linear import refresh_all


class OrthoRefresh(L.Callback):
    def __init__(self, cfg: TSVDConfig):
        self.cfg = cfg
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step  # counts optimizer steps: with accumulation, refresh once per step
        if step == self._last_step or not self.cfg.refresh_due(step):
            return
        self._last_step = step
        timed = step % max(1, trainer.log_every_n_steps) == 0
        cuda = trainer.strategy.root_device.type == "cuda"
        if timed and cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with full_parameters(trainer.strategy):  # FSDP: the retraction needs whole factors (one all-gather)
            error = refresh_all(pl_module, self.cfg.ortho_method)  # ends in a host sync
        metrics = {"tsvd/ortho_error": error}
        if timed:
            metrics["tsvd/refresh_ms"] = (time.perf_counter() - start) * 1e3
        pl_module.log_dict(metrics, on_step=True, rank_zero_only=True)
