"""Loss / gradient-norm spike detection (OLMo-core rule) with the actions log, skip and rollback.

Rule (OLMo-core ``StabilityMonitorCallback``): keep the last ``window`` (128) values of each watched series;
once ``warmup`` (64) values are there, step t is a spike if

    x_t - mean(h) > sigmas * std(h)        (sigmas = 6; h = the history *before* t; population std)

for any of the series named in ``monitor.spike.signals``: ``loss`` (training loss), ``grad_norm`` (total gradient
norm before clipping; these two are OLMo-core's and the default) and ``update_ratio`` (‖ΔW‖ / ‖W‖ over all
parameters for the step, measured by :class:`~pc_lightning.callbacks.update_monitor.UpdateMonitor`, which must be
registered before this callback and measure every step). Every finite value then joins its history, spikes
included (as in OLMo-core), so a lasting level shift stops counting as a spike after a while.

Actions (``monitor.spike.action``):

* ``log``: count each spike and log ``spike/count``, ``spike/z_loss``, ``spike/z_grad`` at its step; at the end the
  run gets the tag ``spike.steps`` (comma-separated steps) and the final ``spike/count`` (0 when none).
* ``skip``: as ``log``, and that step's optimizer update is skipped: the gradients are dropped (set to None) in
  ``on_before_optimizer_step``, so the optimizer's step leaves parameters and its state (moments, step counts)
  untouched; the LR schedule still advances (the step is spent). Not supported with ``16-mixed`` (the AMP grad
  scaler refuses a step without gradients), nor with the ``update_ratio`` signal: the update is known only after
  it has been applied (the config refuses both).
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
queued, together with the update ratio (one read of the stacked values). Under DDP the values are averaged over
ranks first (one all-reduce), so every rank decides alike. A signal not watched is not computed.

Gauss-Newton runs (``action: log`` only): the loss is its logged ``train/loss`` (cross-entropy at θ_t), the
"gradient" the norm of the outer step's direction θ_t − θ̂ (what its outer SGD step is given), the update ratio
that of the outer step.
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


# signal -> (metric name of its z-score, key of its history in the callback's state)
SIGNALS = {"loss": ("spike/z_loss", "loss_history"), "grad_norm": ("spike/z_grad", "grad_history"),
           "update_ratio": ("spike/z_update", "update_history")}


class SpikeDetection(L.Callback):
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.signals = list(cfg.signals)
        self.rules = {name: SpikeRule(cfg.window, cfg.warmup, cfg.sigmas) for name in self.signals}
        self._updates = None  # the UpdateMonitor that measures update_ratio (found in setup)
        self.spike_steps: list[int] = []
        self.rollbacks: list[tuple[int, int]] = []  # (spike step, step of the checkpoint restored)
        self._rollback_ckpts: list[tuple[int, str]] = []  # (optimizer step, path), oldest first
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------ reading the signals
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "update_ratio" not in self.signals:
            return
        from pc_lightning.callbacks.update_monitor import UpdateMonitor

        mine = trainer.callbacks.index(self)
        found = [(i, c) for i, c in enumerate(trainer.callbacks) if isinstance(c, UpdateMonitor) and c.every_step]
        if not found or found[0][0] > mine:
            raise ValueError("monitor.spike.signals has update_ratio: register an UpdateMonitor(every_step=True) "
                             "before SpikeDetection (pc_lightning.callbacks.registry does)")
        self._updates = found[0][1]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Lightning divides the loss by accumulate_grad_batches: the sum over micro-batches is the step's mean.
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if "grad_norm" in self.signals:
            grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
            self._grad_norm = get_total_norm(grads).float() if grads else torch.zeros((), device=pl_module.device)
        else:
            self._grad_norm = torch.zeros((), device=pl_module.device)  # marks "a step is being taken"
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

    def _signal(self, name: str, step: int, trainer: L.Trainer) -> torch.Tensor:
        if name == "loss":
            # Gauss-Newton (manual optimisation) runs no backward of its own: its logged training loss
            return self._loss if self._loss is not None else trainer.callback_metrics["train/loss"].detach()
        if name == "grad_norm":
            return self._grad_norm
        if self._updates.last_step != step:  # the monitor measures every step; anything else is a wiring bug
            raise RuntimeError(f"no update ratio was measured for step {step}")
        return self._updates.last_ratio.to(self._grad_norm.device)

    def _decide(self, trainer: L.Trainer, step: int) -> bool:
        values = torch.stack([self._signal(name, step, trainer).float() for name in self.signals])
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")
        numbers = dict(zip(self.signals, values.tolist()))  # the host sync explained in the module docstring
        z = {name: self.rules[name].observe(x) for name, x in numbers.items()}
        if not any(self.rules[name].is_spike(score) for name, score in z.items()):
            return False
        self.spike_steps.append(step)
        log.warning("spike at step %d: %s; action %s", step,
                    ", ".join(f"{name} {numbers[name]:.4g} (z={z[name]:.1f})" for name in self.signals),
                    self.cfg.action)
        if trainer.is_global_zero and trainer.logger is not None:
            metrics = {SIGNALS[name][0]: score for name, score in z.items()}
            trainer.logger.log_metrics({"spike/count": float(len(self.spike_steps)), **metrics}, step=step)
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
        # the optimizer state holds the learning rate of the checkpoint's step; the schedule has moved on (it already
        # stepped for this step), so the next step uses the schedule's current rate, as without the rollback
        for config in trainer.lr_scheduler_configs:
            for group, lr in zip(config.scheduler.optimizer.param_groups, config.scheduler.get_last_lr()):
                group["lr"] = lr
        # the detector's history goes back with the weights, so the higher loss of the older weights is no spike
        saved = state.get("callbacks", {}).get(self.state_key, {})
        for name, rule in self.rules.items():
            rule.history.clear()
            rule.history.extend(saved.get(SIGNALS[name][1], []))
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
        histories = {SIGNALS[name][1]: list(rule.history) for name, rule in self.rules.items()}
        return {**histories, "spike_steps": list(self.spike_steps), "rollbacks": list(self.rollbacks),
                "rollback_ckpts": list(self._rollback_ckpts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, rule in self.rules.items():
            rule.history.extend(state_dict.get(SIGNALS[name][1], []))
        self.spike_steps = list(state_dict.get("spike_steps", []))
        self.rollbacks = [tuple(r) for r in state_dict.get("rollbacks", [])]
        self._rollback_ckpts = [tuple(c) for c in state_dict.get("rollback_ckpts", [])]
