"""Learning-rate multipliers per step (``LambdaLR``): linear warmup, then cosine decay to ``min_lr_ratio`` of the
peak or a constant; and the cosine within one Gauss-Newton outer step (``optim.gn.inner_schedule``)."""

from __future__ import annotations

import math
from typing import Literal

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0


def inner_cosine(k: int, inner_steps: int) -> float:
    """½(1 + cos(π k / K)) at inner step k = 0..K−1 of an outer step: 1 at the first inner step, decaying towards
    0, which it reaches at k = K, i.e. just after the last inner step (as optax's cosine decay over K steps that the
    Gauss-Newton reference joins once per outer step)."""
    return 0.5 * (1.0 + math.cos(math.pi * k / inner_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                    min_lr_ratio: float, after_warmup: Literal["cosine", "constant"] = "cosine",
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(warmup_fraction * total_steps))
    if after_warmup == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_constant(step, warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, min_lr_ratio)
    )
