"""Learning-rate sensitivity and maximum stable learning rate over an LR grid.

Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities"
(arXiv 2309.14322), define the LR sensitivity of a recipe as

    LRsens = E_eta [ min(l(eta), l0) - min_eta l(eta) ]

over a log-spaced grid of learning rates eta, where l(eta) is the final loss trained at eta and l0 the
loss at initialisation (the report passes each run's first training loss; ln(vocab), the loss of a uniform
predictor, for runs recorded before that was logged). A diverged run counts as l0,
so a recipe that trains well over a wide LR range has a small sensitivity.

The maximum stable LR is the largest eta of the grid at which the run did not diverge and kept at least a
fraction f of the improvement over l0 that the grid's best LR reached:

    l0 - l(eta) > f * (l0 - min_eta l(eta))

With f = 0 (the default) that is "ended below l0". A run whose attention collapsed (Wortsman et al.'s
attention-logit growth) does not diverge and usually ends below l0, near the loss of a model without attention;
f = 0.5 counts it as unstable (it lost more than half of what the best LR gained).
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


def max_stable_lr(losses: Mapping[float, float | None], initial_loss: float, fraction: float = 0.0) -> float | None:
    """Largest lr whose run did not diverge and kept more than ``fraction`` of the best LR's improvement over l0
    (fraction 0: ended below l0); None if there is none."""
    best = min((capped_loss(loss, initial_loss) for loss in losses.values()), default=initial_loss)
    bar = initial_loss - fraction * (initial_loss - best)
    stable = [lr for lr, loss in losses.items()
              if loss is not None and math.isfinite(loss) and loss < initial_loss and loss < bar]
    return max(stable) if stable else None
