"""The spectral-energy rank rule of the TSVD layer (Kamali et al., arXiv 2605.28573; DESIGN.md section 4).

    energy_rank(σ, τ) = smallest r with Σ_{i≤r} σ_i² ≥ τ · Σ_i σ_i²   (σ sorted by |σ| descending)

Applied to the layer's own r singular values at every check, this rule only ever shrinks: once r ≥ 1/(1 − τ)
(20 at τ = 0.95) the smallest value carries s_r² ≤ Σ s²/r < (1 − τ) Σ s², so every check cuts another
(1 − τ) of what is left, whatever the spectrum (64 → 17 in 25 checks). It cannot see what lies outside the
layer's subspace, and it forgets what it cut before. :func:`next_rank` applies τ instead to an estimate of the
spectrum of the matrix the layer stands for:

    spectrum = inside ∪ max(outside, dropped)

* ``inside``: the layer's r singular values after the lookahead step (:mod:`pc_lightning.layers.lookahead`;
  just |s| without one);
* ``outside``: the singular values the lookahead step puts in k new directions outside the layer's subspaces
  (the augmented-basis block of rank-adaptive dynamical low-rank training);
* ``dropped``: the values the rule left out at earlier checks, kept by the layer (``TSVDLinear.dropped``)
  and decayed as the optimizer decays s. The element-wise maximum with ``outside`` (both sorted) counts a
  direction that the loss pulls back once, not twice.

The new rank is energy_rank(spectrum, τ), moved at most ``max_shrink_fraction`` of r down (OIALR / DLRT
practice) and at most k up (the augmented core's size: growth needs the new directions), within
[r_min, r_max]. What it leaves out becomes the new ``dropped`` (at most min(m, n) − rank values). So the rule
is idempotent: a layer whose spectrum does not change keeps its rank, instead of losing (1 − τ) of its energy
at every check; it shrinks when its own spectrum concentrates or the dropped energy decays away, and grows when
the step puts more than (1 − τ) of the energy outside.
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
    keep: int  # how many of the layer's directions stay (those with the largest |s|)
    dropped: torch.Tensor  # the values left out, descending: the layer's new ``dropped``


def next_rank(inside: torch.Tensor, outside: torch.Tensor, dropped: torch.Tensor, tau: float, r_min: int,
              r_max: int, max_shrink_fraction: float, full: int) -> RankDecision:
    """The rank a layer of rank len(inside) and min(m, n) = ``full`` moves to; see the module docstring.

    The layer ends up holding the top ``rank`` values of the spectrum: the inside ones among them stay (at least
    r·(1 − max_shrink_fraction) of them), the outside ones among them come in as new directions (at most
    len(outside): with no lookahead the layer cannot grow)."""
    current, new_dirs = inside.numel(), outside.numel()
    inside, beyond = sorted_desc(inside), merge_outside(outside, dropped).to(inside.device)
    spectrum = torch.sort(torch.cat([inside, beyond]), descending=True).values
    rank = energy_rank(spectrum, tau) if spectrum.numel() else current
    floor = math.ceil(current * (1.0 - max_shrink_fraction))
    rank = min(max(rank, floor, r_min), r_max, full, current + new_dirs)
    # of the top `rank` values, how many are inside; the layer's own directions rank (2 − τ)× higher here: an
    # outside value replaces an inside one only if larger by more than the energy rule's tolerance, so nearly
    # equal directions do not take turns (each turn would drop a trained direction for an untrained one)
    if rank and beyond.numel():
        incumbent = inside * (2.0 - tau)
        cut = torch.sort(torch.cat([incumbent, beyond]), descending=True).values[rank - 1]
        inside_top = int((incumbent >= cut).sum())
    else:
        inside_top = min(rank, current)
    keep = min(max(inside_top, floor, rank - new_dirs), current, rank)
    add = rank - keep
    left_out = torch.cat([inside[keep:], beyond[add:]])
    left_out = torch.sort(left_out, descending=True).values[: max(full - rank, 0)]
    return RankDecision(rank, keep, left_out[left_out > 0])
