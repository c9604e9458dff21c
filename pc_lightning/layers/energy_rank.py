"""The spectral-energy rank rule of the TSVD layer (Kamali et al., arXiv 2605.28573; DESIGN.md section 4).

    energy_rank(s, τ) = smallest r with Σ_{i≤r} s_i² ≥ τ · Σ_i s_i²   (s sorted by |s| descending)

:func:`next_rank` turns that into the rank a layer moves to at a check: never shrink by more than
``max_shrink_fraction`` of the current rank at once (OIALR / DLRT practice), grow by ``grow_fraction``
when every current direction is needed to reach τ (the energy rule alone cannot see beyond the current
rank), and clamp to [r_min, r_max].
"""

from __future__ import annotations

import math

import torch


def energy_rank(s: torch.Tensor, tau: float, r_min: int = 1, r_max: int | None = None) -> int:
    """Smallest r with Σ_{i≤r} s_i² ≥ τ Σ s_i² (largest |s| first), clamped to [r_min, r_max]."""
    energy = torch.sort(s.detach().float() ** 2, descending=True).values
    cumulative = torch.cumsum(energy, dim=0)
    total = cumulative[-1]
    r = int((cumulative < tau * total).sum().item()) + 1 if total > 0 else r_min
    r = min(r, s.numel())
    if r_max is not None:
        r = min(r, r_max)
    return max(r, r_min)


def next_rank(s: torch.Tensor, tau: float, r_min: int, r_max: int, max_shrink_fraction: float,
              grow_fraction: float) -> int:
    """The rank a layer with singular values ``s`` moves to at a rank check."""
    current = s.numel()
    r = energy_rank(s, tau)
    if r == current and grow_fraction > 0:
        r = current + math.ceil(grow_fraction * current)
    r = max(r, math.ceil(current * (1.0 - max_shrink_fraction)))
    return min(max(r, r_min), r_max)
