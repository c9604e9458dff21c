"""The plain linear layer (no bias) that every other linear kind must be interchangeable with."""

from __future__ import annotations

import torch
from torch import nn


class DenseLinear(nn.Linear):
    """nn.Linear without bias, plus the `init_weights(std)` hook the model calls for every linear kind."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies; what merge/export and the spectrum monitor read."""
        return self.weight
