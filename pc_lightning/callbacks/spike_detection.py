"""Loss / gradient-norm spike detection (OLMo-core rule) with the actions log, skip and rollback.

Rule (OLMo-core ``StabilityMonitorCallback``): keep the last ``window`` (128) values of the training loss and of
the gradient norm; once ``warmup`` (64) values are there, step t is a spike if

    x_t - mean(h) > sigmas * std(h)        (sigmas = 6; h = the history *before* t; population std)

for the loss or for the gradient norm. Every finite value then joins its history, spikes included (as in
OLMo-core), so a lasting level shift stops counting as a spike after a while.

Actions (``monitor.spike.action``):

* ``log``: count each spike and log ``spike/count``, ``spike/z_loss``, ``spike/z_grad`` at its step; at the end the
  run gets the tag ``spike.steps`` (comma-separated steps) and the final ``spike/count`` (0 when none).
* ``skip``: as ``log``, and that step's optimizer update is skipped: the gradients are dropped (set to None) in
  ``on_before_optimizer_step``, so the optimizer's step leaves parameters and its state (moments, step counts)
  untouched; the LR schedule still advances (the step is spent). Not supported with ``16-mixed`` (the AMP grad
  scaler refuses a step without gradients).
* ``rollback`` (PaLM, Chowdhery et al. 2022, section 5.1): as ``log``, and on a spike the weights and optimizer
  state are restored from the rollback checkpoint saved ~``rollback_steps_back`` steps earlier, the next
  ``rollback_skip_batches`` batches of the data stream are skipped, and training continues. The optimizer-step
  counter (and with it the LR schedule and the step budget) keeps running: the rolled-back steps count as spent.

Host syncs: the decision needs the loss and grad norm on the host. Under Lightning's automatic optimisation the
update runs inside ``optimizer.step(closure)`` right after ``on_before_optimizer_step``; a device-side 0/1 factor
on the gradients would still move Adam's moments and step count and apply weight decay, and keeping a copy of
parameters and optimizer state to blend back would cost 3x the parameter memory every step. So ``skip`` reads
two scalars (loss, grad norm) on the host after the backward; PretrainModule's divergence check already syncs on
the loss every step, so the added cost is that the optimizer's kernels are queued after the backward finishes
instead of while it runs. ``log`` and ``rollback`` read them in ``on_train_batch_end``, after the update is
queued. Under DDP the two values are averaged over ranks first (one all-reduce), so every rank decides alike.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.nn.utils import get_total_norm

from pc_lightning.config import SpikeConfig

log = logging.getLogger(__name__)


class SpikeRule:
    """The OLMo-core rule on one series: ``observe(x)`` returns the z-score of x against the history before it
    (0 while fewer than ``warmup`` values are known), then adds x to the history."""

    def __init__(self, window: int = 128, warmup: int = 64, sigmas: float = 6.0):
        self.history: deque[float] = deque(maxlen=window)
        self.warmup, self.sigmas = warmup, sigmas

    def observe(self, value: float) -> float:
        z = 0.0
        if len(self.history) >= self.warmup:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((h - mean) ** 2 for h in self.history) / len(self.history))
            if not math.isfinite(value):
                z = math.inf
            elif std > 1e-12:
                z = (value - mean) / std
        if math.isfinite(value):
            self.history.append(value)
        return z

    def is_spike(self, z: float) -> bool:
        return z > self.sigmas


def find_spikes(trace: Iterable[float], window: int = 128, warmup: int = 64, sigmas: float = 6.0) -> list[int]:
    """Indices of the spikes the rule finds in a series (the pure function the callback applies step by step)."""
    rule = SpikeRule(window, warmup, sigmas)
    return [i for i, x in enumerate(trace) if rule.is_spike(rule.observe(float(x)))]


class SpikeDetection(L.Callback):
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.loss_rule = SpikeRule(cfg.window, cfg.warmup, cfg.sigmas)
        self.grad_rule = SpikeRule(cfg.window, cfg.warmup, cfg.sigmas)
        self.spike_steps: list[int] = []
        self.rollbacks: list[tuple[int, int]] = []  # (spike step, step of the checkpoint restored)
        self._rollback_ckpts: list[tuple[int, str]] = []  # (optimizer step, path), oldest first
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------ reading loss and grad norm
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Lightning divides the loss by accumulate_grad_batches: the sum over micro-batches is the step's mean.
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        self._grad_norm = get_total_norm(grads).float() if grads else torch.zeros((), device=pl_module.device)
        if self.cfg.action == "skip" and self._decide(trainer, trainer.global_step):
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._grad_norm is None:  # still accumulating micro-batches
            return
        step = trainer.global_step - 1  # the optimizer step that just ran
        if self.cfg.action != "skip" and self._decide(trainer, step) and self.cfg.action == "rollback":
            self._rollback(trainer, pl_module, step)
        self._loss = self._grad_norm = None
        if self.cfg.action == "rollback" and trainer.global_step % self.cfg.rollback_steps_back == 0:
            self._save_rollback_checkpoint(trainer)

    def _decide(self, trainer: L.Trainer, step: int) -> bool:
        values = torch.stack([self._loss, self._grad_norm])
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")
        loss, grad_norm = values.tolist()  # the host sync explained in the module docstring
        z_loss, z_grad = self.loss_rule.observe(loss), self.grad_rule.observe(grad_norm)
        if not (self.loss_rule.is_spike(z_loss) or self.grad_rule.is_spike(z_grad)):
            return False
        self.spike_steps.append(step)
        log.warning("spike at step %d: loss %.4f (z=%.1f), grad norm %.4f (z=%.1f); action %s",
                    step, loss, z_loss, grad_norm, z_grad, self.cfg.action)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({"spike/count": float(len(self.spike_steps)), "spike/z_loss": z_loss,
                                        "spike/z_grad": z_grad}, step=step)
        return True

    # ------------------------------------------------------------------ rollback
    def _rollback_dir(self, trainer: L.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        root = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir)
        return root / "rollback"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cfg.action == "rollback" and not self._rollback_ckpts:
            self._save_rollback_checkpoint(trainer)

    def _save_rollback_checkpoint(self, trainer: L.Trainer) -> None:
        path = self._rollback_dir(trainer) / f"step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self._rollback_ckpts.append((trainer.global_step, str(path)))
        while len(self._rollback_ckpts) > 2:  # the older of the two is >= rollback_steps_back steps back
            _, old = self._rollback_ckpts.pop(0)
            if trainer.is_global_zero:
                Path(old).unlink(missing_ok=True)

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        target = step + 1 - self.cfg.rollback_steps_back
        candidates = [c for c in self._rollback_ckpts if c[0] <= target] or self._rollback_ckpts[:1]
        ckpt_step, path = candidates[-1]
        state = torch.load(path, map_location=pl_module.device, weights_only=False)
        pl_module.load_state_dict(state["state_dict"])
        for optimizer, opt_state in zip(trainer.optimizers, state["optimizer_states"]):
            optimizer.load_state_dict(opt_state)
        # the detector's history goes back with the weights, so the higher loss of the older weights is no spike
        saved = state.get("callbacks", {}).get(self.state_key, {})
        for rule, key in ((self.loss_rule, "loss_history"), (self.grad_rule, "grad_history")):
            rule.history.clear()
            rule.history.extend(saved.get(key, []))
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_batches"):
            datamodule.skip_batches(self.cfg.rollback_skip_batches)
        self.rollbacks.append((step, ckpt_step))
        # later checkpoints hold the weights that led to the spike
        for later_step, later_path in self._rollback_ckpts:
            if later_step > ckpt_step and trainer.is_global_zero:
                Path(later_path).unlink(missing_ok=True)
        self._rollback_ckpts = [c for c in self._rollback_ckpts if c[0] <= ckpt_step]
        log.warning("rolled back to step %d (%s), skipping %d batches", ckpt_step, path,
                    self.cfg.rollback_skip_batches)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({"spike/rollback_to": float(ckpt_step)}, step=step)

    # ------------------------------------------------------------------ run summary and resume
    def _summarise(self, trainer: L.Trainer) -> None:
        logger = trainer.logger
        if not trainer.is_global_zero or not isinstance(logger, MLFlowLogger) or logger.run_id is None:
            return
        logger.log_metrics({"spike/count": float(len(self.spike_steps))}, step=trainer.global_step)
        logger.experiment.set_tag(logger.run_id, "spike.steps", ",".join(map(str, self.spike_steps))[:5000])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarise(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._summarise(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": list(self.loss_rule.history), "grad_history": list(self.grad_rule.history),
                "spike_steps": list(self.spike_steps), "rollbacks": list(self.rollbacks),
                "rollback_ckpts": list(self._rollback_ckpts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_rule.history.extend(state_dict.get("loss_history", []))
        self.grad_rule.history.extend(state_dict.get("grad_history", []))
        self.spike_steps = list(state_dict.get("spike_steps", []))
        self.rollbacks = [tuple(r) for r in state_dict.get("rollbacks", [])]
        self._rollback_ckpts = [tuple(c) for c in state_dict.get("rollback_ckpts", [])]
