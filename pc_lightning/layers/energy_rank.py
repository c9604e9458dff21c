"""The spectral-energy rank rule of the TSVD layer (Kamali et al., arXiv 2605.28573; docs/tsvd.md).

    energy_rank(σ, τ) = smallest r with Σ_{i≤r} σ_i² ≥ τ · Σ_i σ_i²   (σ sorted by |σ| descending)

Applied to the layer's own r singular values at every check, this rule only ever shrinks: once r ≥ 1/(1 − τ)
(20 at τ = 0.95) the smallest value carries s_r² ≤ Σ s²/r < (1 − τ) Σ s², so every check cuts another
(1 − τ) of what is left, whatever the spectrum (64 → 17 in 25 checks). It cannot see what lies outside the
layer's subspace, and it forgets what it cut before. :func:`next_rank` applies τ instead to an estimate of the
spectrum of the matrix the layer stands for:

    spectrum = inside ∪ max(outside, dropped)     (the layer can hold only inside and outside ones)

* ``inside``: the layer's r singular values after the lookahead step (:mod:`pc_lightning.layers.lookahead`;
  just |s| without one);
* ``outside``: the singular values the lookahead step puts in k new directions outside the layer's subspaces
  (the augmented-basis block of rank-adaptive dynamical low-rank training);
* ``dropped``: the values the rule left out at earlier checks, kept by the layer (``TSVDLinear.dropped``)
  and decayed as the optimizer decays s. The element-wise maximum with ``outside`` (both sorted) counts a
  direction that the loss pulls back once, not twice.

The layer then holds the largest inside and outside values that together reach τ of the spectrum's energy (the
dropped values count in the total but have no direction to hold): moved at most ``max_shrink_fraction`` of r
down (OIALR / DLRT practice) and at most k up (the augmented core's size), within [r_min, r_max]. A strong
outside direction may also replace a weak inside one (the truncation of DLRT's augmented core does the same),
if larger by more than a factor 2 − τ; growth takes only outside directions worth at least the weakest kept
inside one / (2 − τ). What the layer leaves out becomes the new ``dropped`` (at most min(m, n) − rank values).
So the rule is idempotent: a layer whose spectrum does not change keeps its rank, instead of losing (1 − τ) of
its energy at every check; it shrinks when its own spectrum concentrates or the dropped energy decays away, and
grows when the lookahead puts more than (1 − τ) of the energy in directions worth a slot.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def energy_rank(s: torch.Tensor, tau: float, r_min: int = 1, r_max: int | None = None) -> int:
    """Smallest r with Σ_{i≤r} s_i² ≥ τ Σ s_i² (largest |s| first), clamped to [r_min, r_max]."""
    energy = torch.sort(s.detach().float() ** 2, descending=True).values
    cumulative = torch.cumsum(energy, dim=0)
    total = cumulative[-1] if energy.numel() else energy.new_zeros(())
    r = int((cumulative < tau * total).sum().item()) + 1 if total > 0 else r_min
    r = min(r, s.numel())
    if r_max is not None:
        r = min(r, r_max)
    return max(r, r_min)


def sorted_desc(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.detach().float().abs().flatten(), descending=True).values


def merge_outside(outside: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of the two spectra, both sorted descending (the shorter padded with zeros)."""
    a, b = sorted_desc(outside), sorted_desc(dropped)
    n = max(a.numel(), b.numel())
    a = torch.cat([a, a.new_zeros(n - a.numel())])
    b = torch.cat([b, b.new_zeros(n - b.numel())]).to(a.device)
    return torch.maximum(a, b)


class RankDecision(NamedTuple):
    rank: int  # the new rank = keep + (rank − keep) new directions
    keep: int  # how many of the layer's directions stay (the largest after the lookahead step, or |s|)
    dropped: torch.Tensor  # the values left out, descending: the layer's new ``dropped``


def next_rank(inside: torch.Tensor, outside: torch.Tensor, dropped: torch.Tensor, tau: float, r_min: int,
              r_max: int, max_shrink_fraction: float, full: int) -> RankDecision:
    """The rank a layer of rank len(inside) and min(m, n) = ``full`` moves to; see the module docstring.

    The candidates are the layer's own directions (``inside``, counted (2 − τ)× higher in the order: an outside
    value must beat an inside one by more than the energy rule's tolerance to displace it, so nearly equal
    directions do not take turns, each turn dropping a trained direction for an untrained one), the
    lookahead's (``outside``) and the dropped values (the part of max(outside, dropped) that the lookahead
    does not explain). They are taken in order of score until τ of the total energy is held; a dropped value
    taken holds energy but no direction (the layer cannot hold it again), so an inside direction clearly
    weaker than a value dropped before goes as well. At least r·(1 − max_shrink_fraction) (and r_min) of the
    layer's directions stay; an outside direction that raises the rank, rather than replacing an inside one,
    comes in only if worth at least the weakest kept inside one / (2 − τ)."""
    current, margin, device = inside.numel(), 2.0 - tau, inside.device
    inside, outside = sorted_desc(inside), sorted_desc(outside).to(device)
    beyond = merge_outside(outside, dropped).to(device)  # a direction the loss pulls back counts once
    padded = torch.cat([outside, outside.new_zeros(beyond.numel() - outside.numel())])
    phantom = (beyond.square() - padded.square()).clamp_min(0).sqrt()  # dropped energy the lookahead lacks
    kind = torch.cat([torch.zeros(current), torch.ones(outside.numel()), torch.full((phantom.numel(),), 2.0)])
    values = torch.cat([inside, outside, phantom])
    score = torch.cat([inside * margin, outside, phantom])
    order = torch.sort(score, descending=True, stable=True).indices
    held = torch.cumsum(values[order].square(), dim=0)
    total = float(held[-1]) if held.numel() else 0.0
    taken = int((held < tau * total).sum()) + 1 if total > 0 else values.numel()
    chosen = kind[order[:taken]].to(device)
    floor = max(math.ceil(current * (1.0 - max_shrink_fraction)), min(r_min, current))
    keep = min(max(int((chosen == 0).sum()), floor), current, r_max)
    room = max(min(r_max, full) - keep, 0)
    add = min(int((chosen == 1).sum()), room)
    swaps = min(add, max(current - keep, 0))  # outside directions in place of inside ones: they won on score
    smallest_kept = float(inside[keep - 1]) if keep else 0.0
    add = swaps + int((outside[swaps:add] * margin >= smallest_kept).sum())  # growth: only what is worth a slot
    rank = keep + add
    left_out = torch.cat([inside[keep:], beyond[add:]])
    left_out = torch.sort(left_out, descending=True).values[: max(full - rank, 0)]
    return RankDecision(rank, keep, left_out[left_out > 0])
