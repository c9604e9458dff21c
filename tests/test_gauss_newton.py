"""The Gauss-Newton model against explicit Jacobians, and GN / layer-wise GN runs through train(), for the
dense, PC and TSVD models and with z-loss."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch.nn.attention import SDPBackend, sdpa_kernel

from pc_lightning import tracking
from pc_lightning.callbacks.pc_step import PCStep
from pc_lightning.callbacks.registry import configured_callbacks
from pc_lightning.config import ModelConfig, PCConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear
from pc_lightning.layers.tsvd_linear import TSVDLinear, orthonormality_error, refresh_all
from pc_lightning.model import Llama
from pc_lightning.modules.gauss_newton import GaussNewtonModule
from pc_lightning.modules.pretrain import next_token_loss
from pc_lightning.optim.gauss_newton import GaussNewtonModel, cross_entropy_hvp, z_loss_hvp
from pc_lightning.train import train
from helpers import StopAt, assert_same_training_state

VOCAB, BATCH, SEQ = 24, 2, 5
N_TOKENS = BATCH * SEQ


@pytest.fixture()
def setup():
    """A tiny Llama in fp32, θ_t, one batch, and the GN model of all its parameters."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randint(0, VOCAB, (BATCH, SEQ)), torch.randint(0, VOCAB, (BATCH, SEQ))
    return model, theta, x, y


def explicit_jacobian(gn: GaussNewtonModel, names: list[str]) -> torch.Tensor:
    """J as an (N·V, P) matrix from torch.func.jacrev."""
    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.func.jacrev(gn.logits_of)(gn.primals)
    return torch.cat([jac[n].reshape(N_TOKENS * VOCAB, -1) for n in names], dim=1)


def explicit_hessian(probs: torch.Tensor) -> torch.Tensor:
    """Block-diagonal (diag(p) − p pᵀ) / N over tokens, formed explicitly."""
    return torch.block_diag(*[(torch.diag(p) - torch.outer(p, p)) / N_TOKENS for p in probs])


def flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def test_cross_entropy_hvp_is_the_logit_hessian():
    torch.manual_seed(0)
    z, v, y = torch.randn(VOCAB), torch.randn(VOCAB), torch.tensor(3)
    hessian = torch.func.hessian(lambda logits: F.cross_entropy(logits[None], y[None]))(z)
    assert torch.allclose(cross_entropy_hvp(torch.softmax(z, -1), v), hessian @ v, atol=1e-6)


@pytest.mark.parametrize("free", ["all", "block1"])
def test_gn_vector_product_equals_explicit_jacobians(setup, free):
    model, theta, x, y = setup
    names = list(theta) if free == "all" else [n for n in theta if n.startswith("blocks.1.")]
    gn = GaussNewtonModel(model, theta, names, x, y)
    torch.manual_seed(1)
    v = {n: torch.randn_like(theta[n]) for n in names}
    jac = explicit_jacobian(gn, names)
    expected = jac.T @ (explicit_hessian(gn.probs) @ (jac @ flat(v, names)))
    got = flat(gn.vector_product(v), names)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_gn_model_value_and_gradient(setup):
    model, theta, x, y = setup
    names = list(theta)
    gn = GaussNewtonModel(model, theta, names, x, y, damping=0.0)
    # at Δ = 0: the true loss and the true gradient
    value, grads = gn.value_and_grad({n: torch.zeros_like(theta[n]) for n in names})
    loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    # at Δ ≠ 0, damped: value and gradient of the explicit quadratic
    damping = 0.3
    gn = GaussNewtonModel(model, theta, names, x, y, damping=damping)
    torch.manual_seed(2)
    delta = {n: 1e-2 * torch.randn_like(theta[n]) for n in names}
    jac, hessian, d = explicit_jacobian(gn, names), explicit_hessian(gn.probs), flat(delta, names)
    g0 = gn.grad_logits.reshape(-1)
    u = jac @ d
    expected_value = gn.loss0 + g0 @ u + 0.5 * u @ hessian @ u + 0.5 * damping * d @ d
    expected_grad = jac.T @ (g0 + hessian @ u) + damping * d
    value, grads = gn.value_and_grad(delta)
    assert value.item() == pytest.approx(expected_value.item(), rel=1e-5)
    assert torch.allclose(flat(grads, names), expected_grad, atol=1e-5 * expected_grad.abs().max())
    (half,) = gn.value(delta, alphas=(0.5,))
    expected_half = gn.loss0 + 0.5 * g0 @ u + 0.125 * (u @ hessian @ u + damping * d @ d)
    assert half.item() == pytest.approx(expected_half.item(), rel=1e-5)


def test_layerwise_solve_groups_cover_every_parameter_once(tiny_cfg):
    from pc_lightning.config import to_dict

    cfg = tiny_cfg(**{"optim.name": "gn_layerwise", "model.vocab_size": 512})
    module = GaussNewtonModule(to_dict(cfg), total_steps=2)
    groups = module.solve_groups()
    assert len(groups) == cfg.model.n_layers + 1
    flat_names = [n for g in groups for n in g]
    assert sorted(flat_names) == sorted(n for n, _ in module.model.named_parameters())
    assert all(n.startswith(f"blocks.{i}.") for i, g in enumerate(groups[:-1]) for n in g)


@pytest.mark.parametrize("name", ["gn", "gn_layerwise"])
def test_gauss_newton_run_through_train(tiny_cfg, name):
    cfg = tiny_cfg(name=name, **{"optim.name": name, "optim.gn.inner_steps": 2, "trainer.max_steps": 2,
                                 "trainer.log_every": 1, "trainer.val_every": 2})
    result = train(cfg, quiet=True)
    assert result.status == "finished" and result.step == 2
    run = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_run(result.run_id)
    metrics = run.data.metrics
    for key in ("train/loss", "gn/outer_step", "gn/inner_steps", "gn/alpha", "gn/model_loss", "gn/true_loss",
                "val/loss"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["gn/alpha"] in cfg.optim.gn.line_search
    groups = 1 if name == "gn" else cfg.model.n_layers + 1
    assert metrics["gn/inner_steps"] == 2 * groups


@pytest.mark.slow
def test_gauss_newton_resume_reads_the_stacked_batches_of_the_uninterrupted_run(tiny_cfg):
    """A GN run stopped after outer step 1 of 3 and resumed ends bit for bit where the uninterrupted run ends: each
    outer step reads its own (inner_steps + 1) * B windows however the run was cut."""
    keys = {"optim.name": "gn", "optim.inner_steps": 1, "trainer.max_steps": 3, "trainer.checkpoint_every": 1,
            "trainer.val_every": 3}
    straight = train(tiny_cfg(name="gn-straight", **keys), quiet=True)
    first = train(tiny_cfg(name="gn-split", **keys), extra_callbacks=[StopAt(1)], quiet=True)
    assert first.step == 1
    resumed = train(tiny_cfg(name="gn-split", **keys), resume="last", quiet=True)
    assert resumed.step == straight.step == 3
    load = lambda result: torch.load(f"{result.checkpoint_dir}/last.ckpt", map_location="cpu", weights_only=False)
    assert_same_training_state(load(straight), load(resumed))


# ---------------------------------------------------------------------------------------- model variants
def variant_model(linear: str, z_loss: float, **variant) -> Llama:
    """A tiny fp64 Llama with every block matrix a PC (level 2) or TSVD layer. TSVD raw factors are moved
    off their cached orthonormal copies, as between refreshes, so the straight-through map is exercised."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, linear=linear,
                      pc=PCConfig(level=2, targets=["ffn", "attn_out", "qk", "v"]), z_loss=z_loss, **variant)
    model = Llama(cfg).double()
    with torch.no_grad():
        for _, layer in iter_layers(model, TSVDLinear):
            layer.U.add_(1e-2 * torch.randn_like(layer.U))
            layer.V.add_(1e-2 * torch.randn_like(layer.V))
    return model


def explicit_loss_hessian(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Block-diagonal over tokens: torch.func.hessian of CE_i + z_loss·(log Z_i)², divided by N."""
    def token_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z[None], y[None]) + z_loss * torch.logsumexp(z, dim=-1) ** 2

    return torch.block_diag(*[torch.func.hessian(token_loss)(z, y) / N_TOKENS for z, y in zip(logits, targets)])


def test_z_loss_curvature_is_the_exact_hessian_for_nonnegative_log_z_and_psd_otherwise():
    torch.manual_seed(0)
    z_loss, v = 0.1, torch.randn(VOCAB, dtype=torch.float64)
    for shift in (3.0, -40.0):  # log Z > 0, log Z < 0
        z = torch.randn(VOCAB, dtype=torch.float64) + shift
        p, s = torch.softmax(z, -1), torch.logsumexp(z, -1)
        got = z_loss_hvp(p[None], s[None], v[None], z_loss)[0]
        matrix = torch.func.jacrev(lambda w: z_loss_hvp(p[None], s[None], w[None], z_loss)[0])(v)
        assert torch.linalg.eigvalsh(matrix).min() >= -1e-12  # PSD
        if shift > 0:
            exact = torch.func.hessian(lambda logits: z_loss * torch.logsumexp(logits, -1) ** 2)(z)
            torch.testing.assert_close(got, exact @ v)
        else:  # residual term clamped away: the generalised-GN part 2λ p pᵀ alone
            torch.testing.assert_close(got, 2 * z_loss * p * (p @ v))


QKV_HEAD = {"attn_norm": "qkv_norm", "qk_norm_scope": "head"}
QK_FULL = {"attn_norm": "qk_norm", "qk_norm_scope": "full"}


@pytest.mark.parametrize("linear,z_loss,variant", [("pc", 0.0, {}), ("tsvd", 0.0, {}), ("dense", 0.05, {}),
                                                   ("pc", 0.05, {}), ("dense", 0.0, QKV_HEAD), ("pc", 0.0, QK_FULL)],
                         ids=["pc", "tsvd", "dense-zloss", "pc-zloss", "qkv_norm-head", "pc-qk_norm-full"])
def test_gn_model_of_model_variants_against_explicit_jacobians_and_true_loss(linear, z_loss, variant):
    model = variant_model(linear, z_loss, **variant)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(theta)
    x, y = torch.randint(0, VOCAB, (BATCH, SEQ)), torch.randint(0, VOCAB, (BATCH, SEQ))
    gn = GaussNewtonModel(model, theta, names, x, y, damping=0.0, z_loss=z_loss)
    # at Δ = 0: the training loss (next_token_loss, fp32) and the gradient through the real forward
    value, grads = gn.value_and_grad({n: torch.zeros_like(theta[n]) for n in names})
    loss, _, _ = next_token_loss(model(x), y, z_loss)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6 * p.grad.abs().max()), n
    # G v = Jᵀ H J v with J from jacrev and H the exact logit Hessian of the loss (log Z > 0 here)
    assert gn.log_z.min() > 0
    torch.manual_seed(1)
    v = {n: torch.randn_like(theta[n]) for n in names}
    jac = explicit_jacobian(gn, names)
    hessian = explicit_loss_hessian(gn.logits_of(gn.primals).detach().reshape(N_TOKENS, VOCAB), y.reshape(-1),
                                    z_loss)
    expected = jac.T @ (hessian @ (jac @ flat(v, names)))
    torch.testing.assert_close(flat(gn.vector_product(v), names), expected, rtol=1e-9, atol=1e-9)


def test_pc_step_is_not_registered_for_gauss_newton(tiny_cfg):
    from pc_lightning.config import to_dict

    for name, registered in (("adamw", True), ("gn", False), ("gn_layerwise", False)):
        cfg = tiny_cfg(**{"optim.name": name, "model.linear": "pc", "model.vocab_size": 512})
        callbacks = configured_callbacks(cfg, GaussNewtonModule(to_dict(cfg), total_steps=1))
        assert any(isinstance(c, PCStep) for c in callbacks) == registered, name


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_line_search_sees_tsvd_factors_as_the_next_forward_will(tiny_cfg, refresh_every):
    """Retracted when OrthoRefresh refreshes after this outer step (step 1 % refresh_every == 0), else the
    cached factors; the caches are left as they were."""
    from pc_lightning.config import to_dict

    cfg = tiny_cfg(**{"optim.name": "gn", "model.linear": "tsvd", "model.vocab_size": 512,
                      "optim.gn.line_search": "[1.0]", "model.tsvd.refresh_every": refresh_every})
    module = GaussNewtonModule(to_dict(cfg), total_steps=1)
    model = module.model
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    direction = {n: 0.05 * torch.randn_like(p) for n, p in theta.items()}
    batch = torch.randint(0, 512, (2, 9))
    caches = [(layer.U_ortho.clone(), layer.V_ortho.clone()) for _, layer in iter_layers(model, TSVDLinear)]
    _, loss = module.line_search(theta, direction, batch)
    for (_, layer), (u, v) in zip(iter_layers(model, TSVDLinear), caches):
        assert torch.equal(layer.U_ortho, u) and torch.equal(layer.V_ortho, v)

    def loss_at_step(retract: bool) -> float:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta[n] + direction[n])
            if retract:
                refresh_all(model, "qr")
            value = float(next_token_loss(model(batch[:, :-1]), batch[:, 1:])[0])
            for (_, layer), (u, v) in zip(iter_layers(model, TSVDLinear), caches):
                layer.U_ortho.copy_(u)
                layer.V_ortho.copy_(v)
        return value

    retracted, cached = loss_at_step(True), loss_at_step(False)
    assert abs(retracted - cached) > 1e-4  # the retraction matters on this step
    assert loss == pytest.approx(retracted if refresh_every == 1 else cached, rel=1e-6)


class VariantChecker(L.Callback):
    """After every outer step: TSVD orthonormality error of the applied factors, distance of the raw factors
    from them (0 once OrthoRefresh has retracted), ranks; whether PC layers hold a per-step W_eff cache."""

    def __init__(self):
        self.ortho_errors: list[float] = []
        self.raw_gaps: list[float] = []
        self.ranks: list[dict[str, int]] = []
        self.pc_cached: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = [layer for _, layer in iter_layers(pl_module.model, TSVDLinear)]
        if layers:
            self.ortho_errors.append(max(float(orthonormality_error(f)) for layer in layers
                                         for f in layer.factors()[::2]))
            self.raw_gaps.append(max(float((raw.detach() - cache).abs().max()) for layer in layers
                                     for raw, cache in ((layer.U, layer.U_ortho), (layer.V, layer.V_ortho))))
            self.ranks.append({name: layer.rank for name, layer in iter_layers(pl_module.model, TSVDLinear)})
        self.pc_cached += [layer.step_weight is not None for layer in [layer for _, layer in iter_layers(pl_module.model, PCLinear)]]


@pytest.mark.parametrize("name,linear,z_loss", [
    ("gn", "pc", 0.0), ("gn", "tsvd", 1e-3),
    pytest.param("gn_layerwise", "pc", 1e-3, marks=pytest.mark.slow),
    pytest.param("gn_layerwise", "tsvd", 0.0, marks=pytest.mark.slow),
])
def test_gauss_newton_runs_with_model_variants(tiny_cfg, name, linear, z_loss):
    """3 outer steps: finite losses, validation, no PC step cache, TSVD factors orthonormal and retracted
    after every outer step; with gn the TSVD rank adaptation (tau = 0.5, every 2 steps) shrinks every layer."""
    checker = VariantChecker()
    cfg = tiny_cfg(name=f"{name}-{linear}", **{
        "optim.name": name, "model.linear": linear, "model.z_loss": z_loss, "model.pc.level": 2,
        "optim.gn.inner_steps": 1, "trainer.max_steps": 3, "trainer.log_every": 1, "trainer.val_every": 3,
        "model.tsvd.rank_check_every": 2 if name == "gn" else 0, "model.tsvd.energy_threshold": 0.5})
    result = train(cfg, extra_callbacks=[checker], quiet=True)
    assert result.status == "finished" and result.step == 3
    metrics = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_run(result.run_id).data.metrics
    for key in ("train/loss", "gn/true_loss", "gn/model_loss", "val/loss") + (("train/log_z",) if z_loss else ()):
        assert math.isfinite(metrics[key]), key
    if linear == "pc":
        assert checker.pc_cached and not any(checker.pc_cached)  # the forward computes W_eff itself
    if linear == "tsvd":
        assert len(checker.ortho_errors) == 3 and max(checker.ortho_errors) <= 1e-4
        assert max(checker.raw_gaps) == 0.0  # OrthoRefresh retracted after every outer step
        assert metrics["tsvd/ortho_error"] <= 1e-4
        if name == "gn":
            first, last = checker.ranks[0], checker.ranks[-1]
            assert all(last[layer] < first[layer] for layer in first)
