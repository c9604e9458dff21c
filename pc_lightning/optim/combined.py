"""Several optimizers stepped as one, so Lightning's automatic optimisation (one optimizer) can drive them.

Muon only takes 2-D matrices, so a Muon run pairs it with AdamW for embeddings, head, norms and gains.
PyTorch has no wrapper for that, hence this small one:

* ``param_groups`` is the union of the parts' groups (the *same* dicts), so ``LambdaLR`` scales every group
  from its own ``initial_lr``, gradient clipping sees every parameter and ``LearningRateMonitor`` logs
  every group;
* ``step(closure)`` evaluates the closure once, then steps every part;
* ``state_dict()`` / ``load_state_dict()`` save and restore every part, so a Lightning checkpoint resumes
  all of them. Per-parameter state lives in the parts (``.optimizers``), not in ``self.state``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        # Optimizer.__init__ sets up hooks and checks that no parameter appears in two groups (across parts).
        super().__init__([{"params": g["params"]} for opt in self.optimizers for g in opt.param_groups], {})
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict["optimizers"]
        if len(parts) != len(self.optimizers):
            raise ValueError(f"checkpoint holds {len(parts)} optimizers, this run has {len(self.optimizers)}")
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)
        # Optimizer.load_state_dict replaces each part's group dicts: share the new ones again.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
