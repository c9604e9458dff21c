"""Learning-rate sensitivity and maximum stable learning rate over an LR grid.

Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities"
(arXiv 2309.14322), define the LR sensitivity of a recipe as

    LRsens = E_eta [ min(l(eta), l0) - min_eta l(eta) ]

over a log-spaced grid of learning rates eta, where l(eta) is the final loss trained at eta and l0 the
loss at initialisation (here ln(vocab), the loss of a uniform predictor). A diverged run counts as l0,
so a recipe that trains well over a wide LR range has a small sensitivity.

The maximum stable LR is the largest eta of the grid at which no run diverged and the loss ended below l0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def capped_loss(loss: float | None, initial_loss: float) -> float:
    """min(l, l0); a diverged run (None, NaN or inf) counts as l0."""
    if loss is None or not math.isfinite(loss):
        return initial_loss
    return min(loss, initial_loss)


def lr_sensitivity(losses: Mapping[float, float | None], initial_loss: float) -> float:
    """Wortsman LRsens for ``{lr: final loss or None if diverged}``."""
    if not losses:
        raise ValueError("need at least one learning rate")
    capped = [capped_loss(loss, initial_loss) for loss in losses.values()]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped)


def max_stable_lr(losses: Mapping[float, float | None], initial_loss: float) -> float | None:
    """Largest lr whose run did not diverge and ended below l0; None if there is none."""
    stable = [lr for lr, loss in losses.items() if loss is not None and math.isfinite(loss) and loss < initial_loss]
    return max(stable) if stable else None
