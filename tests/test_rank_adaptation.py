"""TSVD rank adaptation: the energy rule with the dropped-energy memory and the augmented-basis lookahead.

The layers here are trained on a least-squares problem L(W) = ½ mean_rows ‖(W − T) x‖² whose probe batches
are whitened in each half of their rows, so the gradient of either half is exactly W − T and the loss's
curvature is the identity: the lookahead's Newton step is 1 and its outside values are the target's
singular values that the layer lacks. Between checks the layer trains with AdamW on noisy (non-whitened)
batches and is retracted after every step, as in training.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pc_lightning.callbacks.lookahead_probe import line_search, measure_lookahead
from pc_lightning.callbacks.rank_adaptation import RankAdaptation
from pc_lightning.config import TSVDConfig
from pc_lightning.layers.energy_rank import energy_rank, next_rank
from pc_lightning.layers.tsvd_linear import TSVDLinear

TOL = 1e-4


def target_with_spectrum(sigma: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(n, len(sigma), generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(n, len(sigma), generator=g)).Q
    return q1 @ torch.diag(sigma) @ q2.T


def whitened_batch(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows whose first and second half (the probe's split) each have second moment I (XᵀX / rows = I)."""
    halves = [math.sqrt(rows // 2) * torch.linalg.qr(torch.randn(rows // 2, n, generator=gen)).Q for _ in range(2)]
    return torch.cat(halves)


class Regression(nn.Module):
    """One TSVD layer and the least-squares loss towards ``target``."""

    def __init__(self, target: torch.Tensor, rank: int, **cfg):
        super().__init__()
        n = target.shape[0]
        self.cfg = TSVDConfig(init_rank_fraction=rank / n, min_rank_fraction=1 / n, **cfg)
        self.layer = TSVDLinear(n, n, self.cfg)
        self.layer.init_weights(0.02)
        self.register_buffer("target", target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.forward(x) - x @ self.target.T).square().sum(-1).mean()


def train_and_check(model: Regression, checks: int, steps: int, lr: float = 3e-2, seed: int = 0,
                    lookahead: bool = True) -> list[int]:
    """``checks`` times: ``steps`` AdamW steps on noisy batches (retraction after each), then a rank check on a
    whitened probe batch. Returns the ranks after each check; asserts orthonormal factors throughout."""
    gen = torch.Generator().manual_seed(seed)
    n = model.target.shape[0]
    opt = torch.optim.AdamW(model.layer.parameters(), lr=lr, weight_decay=0.0)
    adaptation = RankAdaptation(model.cfg)
    ranks = []
    for _ in range(checks):
        for _ in range(steps):
            model.loss(torch.randn(64, n, generator=gen)).backward()
            opt.step()
            opt.zero_grad()
            model.layer.refresh()
        probe = whitened_batch(4 * n, n, gen)
        adaptation.check(model, [opt], model.loss if lookahead else None, probe)
        assert float(model.layer.orthonormality_error()) <= TOL
        assert model.layer.r_min <= model.layer.rank <= model.layer.r_max
        ranks.append(model.layer.rank)
    return ranks


# ---------------------------------------------------------------------------------------- the rule
def test_next_rank_remembers_what_it_dropped():
    """The energy rule on a flat spectrum of 64 cuts (1 − τ) of the energy once; applied again with the values
    it dropped it keeps the rank (the old rule, without them, cut another 5% at every check)."""
    s = torch.ones(64)
    rank, keep, dropped = next_rank(s, s.new_zeros(0), s.new_zeros(0), 0.95, 1, 128, 0.5, 128)
    assert rank == keep == 61 and dropped.tolist() == [1.0, 1.0, 1.0]
    again = next_rank(s[:rank], s.new_zeros(0), dropped, 0.95, 1, 128, 0.5, 128)
    assert again.rank == again.keep == 61 and torch.equal(again.dropped, dropped)
    assert energy_rank(s[:rank], 0.95) < rank  # what the old rule did at the second check


def test_next_rank_grows_swaps_and_respects_limits():
    inside, outside, none = torch.ones(8), torch.ones(8), torch.zeros(0)
    assert next_rank(inside, outside, none, 0.95, 1, 64, 0.5, 64)[:2] == (16, 8)
    assert next_rank(inside, outside[:3], none, 0.95, 1, 64, 0.5, 64)[:2] == (11, 8)  # k new at most
    assert next_rank(inside, outside, none, 0.95, 1, 12, 0.5, 64)[:2] == (12, 8)  # r_max
    tiny = torch.full((8,), 1e-3)  # nothing outside, a decaying spectrum inside: shrink, by half at most
    decaying = torch.tensor([10.0] + [0.01] * 19)
    rank, keep, dropped = next_rank(decaying, tiny, none, 0.9, 1, 40, 0.5, 40)
    assert rank == keep == 10 and dropped.numel() == 10 + 8 and dropped.max() == pytest.approx(0.01)
    assert next_rank(decaying, tiny, none, 0.9, 12, 40, 0.5, 40)[:2] == (12, 12)  # r_min
    # strong outside directions replace weak inside ones (at most half of the inside ones go)
    weak = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.1, 0.1, 0.1, 0.1])
    rank, keep, dropped = next_rank(weak, torch.full((8,), 4.0), none, 0.95, 1, 64, 0.5, 64)
    assert (rank, keep) == (12, 4) and dropped.tolist() == pytest.approx([0.1] * 4)
    # a dropped direction that the loss pulls back counts once: max(outside, dropped), not their sum
    assert next_rank(torch.ones(19), torch.ones(1), torch.ones(1), 0.95, 1, 40, 0.5, 40).rank == 19


def test_dropped_values_hold_energy_but_no_direction():
    """What was dropped stops further cuts of equal directions, but it neither keeps a dead direction alive nor
    makes room for a direction the loss barely asks for."""
    none = torch.zeros(0)
    # 60 live directions, one dead (a direction grown earlier that the loss no longer asks for), 3 dropped
    inside = torch.cat([torch.ones(60), torch.zeros(1)])
    rank, keep, _ = next_rank(inside, torch.full((8,), 1e-3), torch.ones(3), 0.95, 1, 128, 0.5, 128)
    assert (rank, keep) == (60, 60)
    # a live direction clearly weaker than a value dropped before goes too
    inside = torch.cat([torch.ones(60), torch.tensor([0.5])])
    assert next_rank(inside, none, torch.ones(3), 0.95, 1, 128, 0.5, 128)[:2] == (60, 60)
    # a lot of dropped energy (the layer's own values decayed faster) does not pull in negligible directions
    rank, keep, _ = next_rank(torch.ones(20), torch.full((20,), 0.01), torch.full((10,), 1.0), 0.95, 1, 128, 0.5,
                              128)
    assert (rank, keep) == (20, 20)


# ---------------------------------------------------------------------------------------- the lookahead
def test_lookahead_of_a_quadratic_is_the_newton_step_to_the_target():
    """Whitened probe: G = W − T, curvature I, so the measured step is 1 and the outside values are the target's
    singular values outside the layer's subspaces; the outside directions are orthogonal to U and V."""
    n, k = 32, 12
    sigma = torch.linspace(2.0, 1.0, k)
    target = target_with_spectrum(sigma, n)
    model = Regression(target, rank=4)
    u, s, vh = torch.linalg.svd(target)
    model.layer._set_factors(u[:, :4], s[:4], vh[:4].T)  # W = best rank-4 approximation of T
    step, found = measure_lookahead([("layer", model.layer)], model.loss,
                                    whitened_batch(4 * n, n, torch.Generator().manual_seed(1)))
    assert step == pytest.approx(1.0, rel=1e-3)
    look = found["layer"]
    torch.testing.assert_close(look.inside, s[:4], rtol=1e-4, atol=1e-4)  # at the optimum in its subspace
    torch.testing.assert_close(look.outside, s[4:8], rtol=1e-3, atol=1e-3)  # the next 4 of the target
    assert float((model.layer.U_ortho.T @ look.u_new).abs().max()) < 1e-5
    assert float((model.layer.V_ortho.T @ look.v_new).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------- (a) - (d)
def test_layer_trained_towards_a_higher_rank_target_grows_towards_it():
    """(a) target of rank 24 (flat spectrum: the energy rule at 0.95 keeps 23 of it), layer at rank 6."""
    target = target_with_spectrum(torch.ones(24), 48)
    model = Regression(target, rank=6)
    ranks = train_and_check(model, checks=6, steps=60)
    assert ranks[0] > 6 and ranks == sorted(ranks)  # grows at the first check and never shrinks on the way
    assert 23 <= ranks[-1] <= 24
    residual = (model.layer.effective_weight() - target).norm() / target.norm()
    assert residual < 0.25  # the grown directions were trained


@pytest.mark.slow  # ~20-80 s: 150 checks
def test_layer_with_a_stationary_useful_spectrum_keeps_its_rank():
    """(b) target with a full decaying spectrum, layer at its energy rank holding its top part; 150 checks of
    noisy training: the rank stays within one of where it started."""
    n = 48
    sigma = 0.95 ** torch.arange(n, dtype=torch.float32)
    target = target_with_spectrum(sigma, n)
    start = energy_rank(sigma, 0.95)
    assert start == 28  # above 1 / (1 − τ) = 20, where the old rule could no longer keep a rank
    model = Regression(target, rank=start)
    u, s, vh = torch.linalg.svd(target)
    model.layer._set_factors(u[:, :start], s[:start], vh[:start].T)
    ranks = train_and_check(model, checks=150, steps=2, lr=3e-3)
    assert max(abs(r - start) for r in ranks) <= 1, ranks


@pytest.mark.parametrize("tau,rank,target_rank", [(0.5, 24, 1), (0.99, 16, 64), (1.0, 16, 64), (0.9, 20, 20)])
def test_ranks_stay_within_bounds(tau, rank, target_rank):
    """(c) r_min = 12, r_max = 32 of 64 under pressure to shrink (rank-1 target, τ = 0.5) or to grow (full-rank
    target, τ = 0.99 / 1.0)."""
    sigma = 0.97 ** torch.arange(target_rank, dtype=torch.float32)
    model = Regression(target_with_spectrum(sigma, 64), rank=rank, energy_threshold=tau)
    model.layer.r_min, model.layer.r_max = 12, 32
    ranks = train_and_check(model, checks=8, steps=10)
    assert all(12 <= r <= 32 for r in ranks)
    assert ranks[-1] == (12 if target_rank == 1 else 32 if target_rank == 64 else ranks[-1])


@pytest.mark.slow  # ~20-90 s
def test_rank_does_not_collapse_while_training_at_its_energy_rank():
    """(d) the same with training and the lookahead: a rank-64 layer of a 128 × 128 least-squares problem whose
    target's energy rank is 64 stays near 64 over 25 checks (the old rule ended below 20)."""
    n = 128
    sigma = torch.ones(n)
    sigma[64:] = 0.05  # 64 directions carry 99.8% of the energy: energy rank 61 of them at τ = 0.95
    target = target_with_spectrum(sigma, n)
    model = Regression(target, rank=64)
    u, s, vh = torch.linalg.svd(target)
    model.layer._set_factors(u[:, :64], s[:64], vh[:64].T)
    ranks = train_and_check(model, checks=25, steps=2, lr=1e-3)
    assert min(ranks) >= energy_rank(sigma, 0.95) - 1, ranks


def test_dropped_values_decay_with_the_weight_decay_of_s():
    """The values a layer dropped fade at the rate the optimizer decays s: once they are gone, the energy rule
    can cut again (a layer whose spectrum stays put shrinks only as fast as decay would shrink a dense tail)."""
    layer = TSVDLinear(64, 64, TSVDConfig(init_rank_fraction=0.5))
    layer.init_weights(0.02)
    opt = torch.optim.AdamW([{"params": [layer.s], "weight_decay": 0.5}], lr=0.1)
    assert RankAdaptation.step_decay([opt], nn.Sequential(layer)) == pytest.approx(1 - 0.05)
    adaptation = RankAdaptation(TSVDConfig())
    model = nn.Sequential(layer)
    adaptation.check(model, [opt])
    first, dropped = layer.rank, layer.dropped.clone()
    adaptation.check(model, [opt])
    assert layer.rank == first and torch.equal(layer.dropped, dropped)
    adaptation.decay = 0.01  # as after many steps of decay
    adaptation.check(model, [opt])
    assert layer.rank < first


@pytest.mark.parametrize("minimum", [0.3, 1.0, 7.0, 1e-4])
def test_line_search_finds_the_minimum_of_a_parabola(minimum):
    calls = []
    loss = lambda t: calls.append(t) or (t - minimum) ** 2  # noqa: E731
    assert line_search(loss, 10.0) == pytest.approx(minimum, rel=1e-6)
    assert len(calls) <= 4 + math.log2(10.0 / minimum)  # stops once the loss rises again
    assert line_search(lambda t: -t, 10.0) == 10.0  # never beyond the longest step
    assert line_search(lambda t: t, 10.0) == 0.0  # no step lowers the loss


def test_randomised_top_singular_pairs_match_the_exact_ones():
    """Above EXACT_SVD_MAX the normal block's top pairs come from a seeded range finder (same on every process)."""
    from pc_lightning.layers.lookahead import EXACT_SVD_MAX, top_singular_pairs

    m, n, k = EXACT_SVD_MAX + 44, EXACT_SVD_MAX + 144, 12
    g = torch.Generator().manual_seed(0)
    sigma = torch.cat([torch.linspace(10.0, 5.0, k), 0.01 * torch.ones(m - k)])
    u = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g)).Q
    a = u @ torch.diag(sigma) @ v.T
    left, right = top_singular_pairs(a, k, seed=3)
    torch.testing.assert_close(torch.diagonal(left.T @ a @ right), sigma[:k], rtol=1e-4, atol=1e-4)
    again = top_singular_pairs(a, k, seed=3)
    assert torch.equal(left, again[0]) and torch.equal(right, again[1])
