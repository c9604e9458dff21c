"""Learning-rate schedules as a per-step multiplier of the peak LR (a LambdaLR), chosen by ``optim.schedule``.

Every shape starts with a linear warmup over W = round(warmup_fraction · N) steps (multiplier (t + 1) / W at
step t, so the last warmup step is at the peak); N = the run's total optimizer steps. Then:

* ``cosine``: min + (1 − min) · ½ (1 + cos(π (t − W) / (N − W))), min = ``min_lr_ratio``;
* ``wsd`` (warmup-stable-decay; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations", arXiv 2405.18392): flat at the peak, then over the last D = round(decay_fraction · N)
  steps (starting at S = N − D) a decay with progress p = (t − S + 1) / D, so that the last step t = N − 1
  reaches min exactly: ``linear`` min + (1 − min)(1 − p), ``1-sqrt`` min + (1 − min)(1 − √p) (the paper's
  cooldown, which it finds better than linear);
* ``constant``: flat at the peak.

:class:`ConfigSchedule` makes a resume follow the *new* config: a checkpoint restores only the step count, the
shape (a function of the config, the total steps and the step) and the peak LRs come from the run's config, so
``--resume`` with another ``optim.schedule``, ``optim.wsd.*`` or ``trainer.max_steps`` continues on the new curve
from the resumed step (how a cooldown is branched from a stable-phase checkpoint).

Also the cosine within one Gauss-Newton outer step (``optim.gn.inner_schedule: per_outer_cosine``), whose outer
multiplier is the ``constant`` shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pc_lightning.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return int(round(cfg.warmup_fraction * total_steps))


def decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """WSD: the first step of the final decay, S = N − round(decay_fraction · N) (never inside the warmup)."""
    decay = max(1, int(round(cfg.wsd.decay_fraction * total_steps)))
    return max(warmup_steps(cfg, total_steps), total_steps - decay)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def inner_cosine(k: int, inner_steps: int) -> float:
    """½(1 + cos(π k / K)) at inner step k = 0..K−1 of an outer step: 1 at the first inner step, decaying towards
    0, which it reaches at k = K, i.e. just after the last inner step (as optax's cosine decay over K steps that the
    Gauss-Newton reference joins once per outer step)."""
    return 0.5 * (1.0 + math.cos(math.pi * k / inner_steps))


def warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, decay_start: int, min_lr_ratio: float,
                        shape: str) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    remaining = 1.0 - (math.sqrt(progress) if shape == "1-sqrt" else progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of the peak LR at optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.schedule == "cosine":
        return warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return warmup_stable_decay(step, total_steps, warmup, decay_start(cfg, total_steps), cfg.min_lr_ratio,
                                   cfg.wsd.decay_shape)
    if cfg.schedule == "constant":
        return (step + 1) / warmup if step < warmup else 1.0
    raise ValueError(f"unknown optim.schedule={cfg.schedule!r}")


class ConfigSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over :func:`lr_multiplier` whose checkpoint restores the step count only.

    ``LambdaLR.load_state_dict`` would also restore the peak LRs (``base_lrs``) of the run that wrote the
    checkpoint, and the optimizer's state holds that run's last LR; here both are set again from this run's config
    at the restored step. Lightning restores the optimizer before the scheduler, so the first resumed step already
    uses the new curve. (The multiplier is a closure, which LambdaLR never saves.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_lrs, total_steps = list(self.base_lrs), self.total_steps  # this run's, from its config
        super().load_state_dict(state_dict)
        self.base_lrs, self.total_steps = base_lrs, total_steps
        lrs = [base * fn(self.last_epoch) for base, fn in zip(base_lrs, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr
        self._last_lr = list(lrs)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig) -> ConfigSchedule:
    return ConfigSchedule(optimizer, total_steps, cfg)
