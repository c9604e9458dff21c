"""Tokens/s and (on GPU) MFU, averaged over each logging interval.

Written instead of using Lightning's ``ThroughputMonitor`` because that one synchronises CUDA on every
batch and builds metric names with '|', which MLflow strips. MFU = achieved model FLOP/s divided by the
device's peak for the compute dtype (Lightning's ``get_available_flops`` table); FLOPs per token from
:func:`pc_lightning.model.flops_per_token` (6 N + attention, dense-equivalent).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


class TokenThroughput(L.Callback):
    def __init__(self, tokens_per_step: int, flops_per_token: float, every: int = 10):
        self.tokens_per_step, self.flops_per_token, self.every = tokens_per_step, flops_per_token, every
        self._t0: float | None = None
        self._step0 = 0
        self.peak_flops: float | None = None
        self.last_tokens_per_sec: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = get_available_flops(device, dtype)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = trainer.global_step - self._step0
        if steps < self.every:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        tps = steps * self.tokens_per_step / (now - self._t0)
        self.last_tokens_per_sec = tps
        metrics = {"perf/tokens_per_sec": tps, "perf/tokens": float(trainer.global_step * self.tokens_per_step)}
        if self.peak_flops:
            metrics["perf/mfu"] = tps * self.flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, rank_zero_only=True)
        self._t0, self._step0 = now, trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # validation time does not count against training throughput
        if self._t0 is not None and getattr(self, "_pause", None) is not None:
            self._t0 += time.perf_counter() - self._pause
