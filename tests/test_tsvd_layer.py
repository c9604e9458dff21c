"""TSVD layer (Kamali et al., arXiv 2605.28573): orthonormal factors at every forward, the energy rank rule,
rank changes with optimizer state, and checkpoint/resume across a rank change."""

from __future__ import annotations

import copy
import math
import os

import lightning as L
import pytest
import pytorch_optimizer
import torch
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.callbacks.rank_adaptation import RankAdaptation, base_optimizers, remap_state
from pc_lightning.config import ConfigError, TSVDConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.energy_rank import energy_rank
from pc_lightning.layers.tsvd_linear import TSVDLinear, orthonormality_error, orthonormalize, refresh_all
from pc_lightning.train import train
from helpers import StopAt

TOL = 1e-4


def tsvd_cfg(tiny_cfg, **extra):
    return tiny_cfg(**{"model.linear": "tsvd", **extra})


def matrix_with_spectrum(sigma: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(m, len(sigma), generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(n, len(sigma), generator=g)).Q
    return q1 @ torch.diag(sigma) @ q2.T


# ---------------------------------------------------------------------------------------- energy rule
def test_energy_rank_on_known_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(s, 0.70) == 1  # 16/22 = 0.727
    assert energy_rank(s, 0.90) == 2  # 20/22 = 0.909
    assert energy_rank(s, 0.95) == 3  # 21/22 = 0.955
    assert energy_rank(s, 1.00) == 4
    assert energy_rank(s[[2, 0, 3, 1]], 0.90) == 2  # order and sign do not matter
    assert energy_rank(-s, 0.90) == 2
    assert energy_rank(s, 0.70, r_min=2) == 2 and energy_rank(s, 1.0, r_max=3) == 3


@pytest.mark.parametrize("m,n", [(48, 32), (32, 48)])
def test_energy_rank_of_matrices_with_known_spectrum(m, n):
    sigma = 0.8 ** torch.arange(32, dtype=torch.float32)  # geometric decay, known exactly
    w = matrix_with_spectrum(sigma, m, n)
    energy = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    for tau in (0.5, 0.9, 0.99):
        expected = int((energy < tau).sum()) + 1
        assert energy_rank(torch.linalg.svdvals(w), tau) == expected
        # a TSVD layer holding W exposes the same spectrum through |s|
        layer = TSVDLinear(n, m, TSVDConfig(init_rank_fraction=1.0))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layer._set_factors(u, s, vh.T)
        assert energy_rank(layer.s, tau) == expected


def test_rank_does_not_collapse_when_nothing_changes():
    """Regression (issue 11): the old rule took a rank-64 layer with a stationary spectrum down to 17 in 25 checks
    (τ = 0.95: every check cut 5% of what was left). Through the callback's ``check``, without a
    gradient (which the old rule never used either), the layer now cuts 5% of its energy once and keeps the
    rest. Fails on the old energy_rank.next_rank / RankAdaptation (ranks 64, 61, 58, ..., 17).
    More in tests/test_rank_adaptation.py."""
    torch.manual_seed(0)
    layer = TSVDLinear(128, 128, TSVDConfig(init_rank_fraction=0.5))
    layer.init_weights(0.02)  # the truncated SVD of a dense init: a flat-ish spectrum, like the tiny run's
    model = torch.nn.Sequential(layer)
    adaptation = RankAdaptation(TSVDConfig(energy_threshold=0.95, max_shrink_fraction=0.5))
    ranks = []
    for _ in range(25):
        adaptation.check(model, [])
        ranks.append(layer.rank)
    assert ranks[-1] >= 56 and len(set(ranks[1:])) == 1, ranks


@pytest.mark.parametrize("key,value", [("max_shrink_fraction", 0.0), ("ns_steps", 0), ("grow_fraction", 0.25),
                                       ("lookahead", "maybe")])
def test_new_tsvd_keys_are_validated(tiny_cfg, key, value):
    with pytest.raises(ConfigError, match=f"model.tsvd.{key}"):
        tiny_cfg(**{f"model.tsvd.{key}": value})


# ---------------------------------------------------------------------------------------- layer
@pytest.mark.parametrize("m,n", [(64, 32), (32, 64), (48, 48)])
@pytest.mark.parametrize("from_svd", [True, False])
def test_effective_weight_is_the_forward_on_identity(m, n, from_svd):
    layer = TSVDLinear(n, m, TSVDConfig(init_from_svd=from_svd, init_rank_fraction=0.25))
    layer.init_weights(0.02)
    assert layer.rank == round(0.25 * min(m, n))
    assert float(layer.orthonormality_error()) <= TOL
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        layer(torch.randn(4, n)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        layer.refresh()
    w = layer.effective_weight()
    assert w.shape == (m, n) and w.dtype == torch.float32
    torch.testing.assert_close(layer(torch.eye(n)).T, w, rtol=0, atol=1e-6)
    # |s| are W's singular values because U and V are orthonormal
    torch.testing.assert_close(torch.linalg.svdvals(w)[: layer.rank], layer.s.abs().sort(descending=True).values,
                               rtol=1e-4, atol=1e-6)


def test_init_scale_matches_the_dense_init():
    std, m, n = 0.02, 96, 64
    dense_rms = std * math.sqrt(max(m, n))  # root-mean-square singular value of a normal(0, std) m x n matrix
    rand = TSVDLinear(n, m, TSVDConfig(init_from_svd=False))
    rand.init_weights(std)
    torch.testing.assert_close(rand.s, torch.full_like(rand.s, dense_rms))
    svd = TSVDLinear(n, m, TSVDConfig(init_from_svd=True, init_rank_fraction=1.0))
    torch.manual_seed(0)
    svd.init_weights(std)
    assert svd.s.pow(2).mean().sqrt().item() == pytest.approx(dense_rms, rel=0.05)
    half = TSVDLinear(n, m, TSVDConfig(init_from_svd=True, init_rank_fraction=0.5))
    torch.manual_seed(0)
    half.init_weights(std)  # the same dense draw, truncated: its top half of the spectrum
    torch.testing.assert_close(half.s, svd.s[: half.rank])
    assert svd.s[0] > 1.5 * svd.s[-1]  # a real spectrum, not the constant of the random-orthonormal init


def test_gradients_reach_raw_factors_and_newton_schulz_retracts():
    layer = TSVDLinear(32, 64, TSVDConfig(ortho_method="newton_schulz"))
    layer(torch.randn(5, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.U, layer.V, layer.s))
    with torch.no_grad():
        layer.U.add_(0.05 * torch.randn_like(layer.U))  # a raw factor a few steps away from orthonormal
    assert float(orthonormality_error(layer.U)) > 1e-2
    cached = layer.U_ortho.clone()
    torch.testing.assert_close(layer.factors()[0], cached)  # the forward still uses the cache
    layer.refresh()
    assert float(layer.orthonormality_error()) <= 1e-5
    torch.testing.assert_close(layer.U, layer.U_ortho)  # written back: the retraction
    q = orthonormalize(layer.U + 1e-3, "qr")
    assert torch.all(torch.diagonal(q.T @ (layer.U + 1e-3)) > 0)  # sign-fixed QR stays near its input


@pytest.mark.parametrize("shape", [(64, 16), (3, 48, 8), (5, 32, 32)], ids=["one", "stack", "square-stack"])
def test_cholesky_qr_is_the_sign_fixed_householder_q(shape):
    """The QR factorisation with diag(R) > 0 is unique, so Cholesky-QR must give Householder's Q; checked on raw
    factors one optimizer step away from orthonormal, as the retraction meets them."""
    torch.manual_seed(0)
    x = orthonormalize(torch.randn(shape), "qr") + 1e-3 * torch.randn(shape)
    q = orthonormalize(x, "cholesky_qr")
    torch.testing.assert_close(q, orthonormalize(x, "qr"), rtol=0, atol=1e-5)
    assert float(orthonormality_error(q)) <= 1e-5


def test_retraction_falls_back_to_householder_when_cholesky_fails():
    layer = TSVDLinear(32, 48, TSVDConfig(init_rank_fraction=0.5))
    with torch.no_grad():
        layer.U[:, 1] = 0.0  # a rank-deficient raw factor: its Gram matrix is singular
    assert torch.isnan(orthonormalize(layer.U, "cholesky_qr")).all()
    assert layer.refresh("cholesky_qr") <= 1e-5
    assert float(layer.orthonormality_error()) <= 1e-5 and torch.equal(layer.U, layer.U_ortho)


def test_retraction_runs_at_ieee_fp32_whatever_the_run_set(monkeypatch):
    """TF32 (precision high/medium, common on GPUs) would leave ‖QᵀQ − I‖ near 1e-3: the retraction switches
    to full fp32 matmuls for its own work and restores the run's choice afterwards."""
    import pc_lightning.layers.tsvd_linear as tsvd

    seen = []
    real = tsvd.orthonormalize
    monkeypatch.setattr(tsvd, "orthonormalize",
                        lambda *a, **k: seen.append(torch.get_float32_matmul_precision()) or real(*a, **k))
    layer = TSVDLinear(32, 48, TSVDConfig())
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        layer.refresh()
        layer.resize(layer.rank + 4)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest"}


def test_model_refresh_is_batched_and_equals_per_layer_refresh(tiny_cfg):
    from pc_lightning.model import Llama

    cfg = tsvd_cfg(tiny_cfg)
    cfg.model.vocab_size = 512
    model = Llama(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    one_by_one = copy.deepcopy(model)
    error = refresh_all(model, "cholesky_qr")
    for (_, a), (_, b) in zip(iter_layers(model, TSVDLinear), iter_layers(one_by_one, TSVDLinear)):
        b.refresh("cholesky_qr")
        for x, y in zip(a.raw_and_cached(), b.raw_and_cached()):
            torch.testing.assert_close(x[0], y[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(x[1], y[1], rtol=0, atol=1e-6)
    assert error <= 1e-5


def test_resize_keeps_top_directions_and_loads_into_a_fresh_layer():
    layer = TSVDLinear(32, 48, TSVDConfig(init_rank_fraction=0.5))
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.1, -3.0, 0.2, 2.0] + [0.01] * 12))
    w_before = layer.effective_weight().detach()
    keep = layer.resize(2)
    assert layer.rank == 2 and keep.tolist() == [1, 3]
    assert layer.s.tolist() == pytest.approx([-3.0, 2.0])
    assert float(layer.orthonormality_error()) <= TOL
    keep = layer.resize(6)  # growth: new directions with s = 0 leave W unchanged
    assert layer.rank == 6 and keep.numel() == 2 and float(layer.orthonormality_error()) <= TOL
    top2 = torch.linalg.svd(w_before)
    torch.testing.assert_close(layer.effective_weight().detach(),
                               top2.U[:, :2] @ torch.diag(top2.S[:2]) @ top2.Vh[:2], rtol=0, atol=1e-5)
    fresh = TSVDLinear(32, 48, TSVDConfig(init_rank_fraction=0.5))
    layer.dropped = torch.tensor([0.5, 0.25])  # what the rank rule left out, kept with the layer
    fresh.load_state_dict(layer.state_dict())  # strict, though the fresh layer was built at rank 16
    assert fresh.rank == 6 and fresh.dropped.tolist() == [0.5, 0.25]
    torch.testing.assert_close(fresh.effective_weight(), layer.effective_weight())
    older = {k: v for k, v in layer.state_dict().items() if k != "dropped"}  # a checkpoint from before it existed
    fresh = TSVDLinear(32, 48, TSVDConfig(init_rank_fraction=0.5))
    fresh.load_state_dict(older)
    assert fresh.rank == 6 and fresh.dropped.numel() == 0


def test_optimizer_state_is_gathered_or_reset():
    layer = TSVDLinear(32, 48, TSVDConfig(init_rank_fraction=0.5))
    adamw = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    soap = pytorch_optimizer.SOAP([layer.U], lr=1e-3)
    for opt in (adamw, soap):
        for _ in range(2):
            layer(torch.randn(4, 32)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        layer.s.copy_(torch.arange(16, dtype=torch.float32))  # |s| ascending: keep = 15, 14, ...
    old = {k: v.clone() for k, v in adamw.state[layer.U].items()}
    shape = layer.U.shape
    keep = layer.resize(4)
    assert remap_state(adamw, layer.U, shape, keep, 1) == "mapped"
    assert remap_state(soap, layer.U, shape, keep, 1) == "reset" and not soap.state.get(layer.U)
    for key in ("exp_avg", "exp_avg_sq"):
        assert adamw.state[layer.U][key].shape == layer.U.shape
        torch.testing.assert_close(adamw.state[layer.U][key], old[key][:, [15, 14, 13, 12]])
    assert torch.equal(adamw.state[layer.U]["step"], old["step"])
    layer(torch.randn(4, 32)).square().sum().backward()
    soap.step()  # re-initialises its state at the new shape


def test_base_optimizers_unwraps_combined():
    from pc_lightning.optim.combined import CombinedOptimizer

    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    parts = [torch.optim.Muon([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2)]
    assert base_optimizers([CombinedOptimizer(parts)]) == parts


# ---------------------------------------------------------------------------------------- training runs
def applied_error(layer: TSVDLinear) -> float:
    """Orthonormality error of the U and V the forward applies (not merely of the cache)."""
    u, _, v = layer.factors()
    return max(float(orthonormality_error(u)), float(orthonormality_error(v)))


class OrthoChecker(L.Callback):
    """Records ‖UᵀU − I‖∞, ‖VᵀV − I‖∞ of every TSVD layer at every forward and after every optimizer step,
    and that every optimizer state tensor keeps its parameter's shape."""

    def __init__(self):
        self.forward_errors: list[float] = []
        self.step_errors: list[float] = []
        self.ranks: list[dict[str, int]] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        for _, layer in iter_layers(pl_module.model, TSVDLinear):
            layer.register_forward_pre_hook(lambda mod, args: self.forward_errors.append(applied_error(mod)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = iter_layers(pl_module.model, TSVDLinear)
        self.step_errors.append(max(applied_error(layer) for _, layer in layers))
        self.ranks.append({name: layer.rank for name, layer in layers})
        self.losses.append(float(outputs["loss"]))
        for opt in base_optimizers(trainer.optimizers):
            for param, state in opt.state.items():
                for value in state.values():
                    if torch.is_tensor(value) and value.ndim > 0:
                        assert value.shape == param.shape


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("ortho,every", [("cholesky_qr", 1), ("qr", 1), ("newton_schulz", 2)])
def test_factors_orthonormal_at_every_forward_and_step(tiny_cfg, optim, ortho, every):
    checker = OrthoChecker()
    cfg = tsvd_cfg(tiny_cfg, **{"optim.name": optim, "model.tsvd.ortho_method": ortho,
                                "model.tsvd.refresh_every": every, "model.tsvd.rank_check_every": 0})
    result = train(cfg, extra_callbacks=[checker], quiet=True)
    assert result.status == "finished" and result.step == 6
    assert len(checker.forward_errors) >= 6 * 14  # 2 blocks x 7 matrices, every training forward
    assert max(checker.forward_errors) <= TOL and max(checker.step_errors) <= TOL
    assert result.metrics["tsvd/ortho_error"] <= TOL


def test_rank_change_mid_run_keeps_training_and_is_logged(tiny_cfg):
    checker = OrthoChecker()
    cfg = tsvd_cfg(tiny_cfg, **{"optim.name": "muon", "model.tsvd.rank_check_every": 2,
                                "model.tsvd.energy_threshold": 0.5, "trainer.max_steps": 8})
    result = train(cfg, extra_callbacks=[checker], quiet=True)
    assert result.status == "finished" and result.step == 8
    assert all(math.isfinite(x) for x in checker.losses)
    first, last = checker.ranks[0], checker.ranks[-1]
    assert all(last[name] < first[name] for name in first)  # tau = 0.5 shrinks every layer
    assert max(checker.forward_errors) <= TOL
    run = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_run(result.run_id)
    assert run.data.metrics["tsvd/rank/blocks.0.attn.q"] == last["blocks.0.attn.q"]
    history = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_metric_history(
        result.run_id, "tsvd/parameters")
    assert history[-1].value < history[0].value


def test_resume_across_rank_change_matches_uninterrupted_run(tiny_cfg):
    steps = {"trainer.max_steps": 8, "trainer.checkpoint_every": 4, "trainer.val_every": 4,
             "model.tsvd.rank_check_every": 2, "model.tsvd.energy_threshold": 0.6}
    straight = train(tsvd_cfg(tiny_cfg, name="tsvd-straight", **steps), quiet=True)
    first = train(tsvd_cfg(tiny_cfg, name="tsvd-split", **steps), extra_callbacks=[StopAt(4)], quiet=True)
    assert first.step == 4
    checker = OrthoChecker()
    resumed = train(tsvd_cfg(tiny_cfg, name="tsvd-split", **steps), resume="last", extra_callbacks=[checker],
                    quiet=True)
    assert resumed.status == "finished" and resumed.step == 8
    a = torch.load(os.path.join(straight.checkpoint_dir, "last.ckpt"), map_location="cpu", weights_only=False)
    b = torch.load(os.path.join(resumed.checkpoint_dir, "last.ckpt"), map_location="cpu", weights_only=False)
    assert a["state_dict"]["model.blocks.0.attn.q.s"].numel() < 16  # the rank did change
    for key, value in a["state_dict"].items():
        assert value.shape == b["state_dict"][key].shape, key
        torch.testing.assert_close(value, b["state_dict"][key], rtol=0, atol=1e-6, msg=key)


def test_refresh_all_reports_error(tiny_cfg):
    from pc_lightning.model import Llama

    cfg = tsvd_cfg(tiny_cfg)
    cfg.model.vocab_size = 512
    model = Llama(cfg.model)
    assert len(iter_layers(model, TSVDLinear)) == 2 * 7
    with torch.no_grad():
        for _, layer in iter_layers(model, TSVDLinear):
            layer.V.add_(0.1 * torch.randn_like(layer.V))
    assert refresh_all(model, "newton_schulz") <= 1e-5


def test_rank_changed_checkpoint_converts_to_dense(tiny_cfg):
    from pc_lightning.merge import merge_model
    from pc_lightning.model import Llama, count_parameters
    from pc_lightning.modules.pretrain import PretrainModule

    cfg = tsvd_cfg(tiny_cfg, **{"model.tsvd.rank_check_every": 2, "model.tsvd.energy_threshold": 0.5,
                                "trainer.max_steps": 4})
    result = train(cfg, quiet=True)
    module = PretrainModule.load_from_checkpoint(os.path.join(result.checkpoint_dir, "last.ckpt"),
                                                 map_location="cpu")  # fresh model at init rank, then resized
    assert module.model.blocks[0].attn.q.rank < 16
    dense = merge_model(module.model)  # raises if merged logits differ by more than 1e-5 (relative)
    dense_cfg = module.cfg.model
    dense_cfg.linear = "dense"
    assert count_parameters(dense) == count_parameters(Llama(dense_cfg))


def test_spectrum_monitor_reads_the_rank_r_spectrum():
    from pc_lightning.callbacks.spectrum_monitor import spectrum_metrics
    from pc_lightning.config import ModelConfig
    from pc_lightning.model import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16,
                              linear="tsvd"))
    layer = model.blocks[0].attn.o
    s = layer.s.detach().abs()
    metrics = spectrum_metrics(model)
    assert metrics["spectrum/blocks.0.attn.o/cond"] == pytest.approx((s.max() / s.min()).item(), rel=1e-4)
