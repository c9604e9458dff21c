"""The Gauss-Newton model against explicit Jacobians, and GN / layer-wise GN runs through train()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch.nn.attention import SDPBackend, sdpa_kernel

from pc_lightning import tracking
from pc_lightning.config import ModelConfig
from pc_lightning.model import Llama
from pc_lightning.modules.gauss_newton import GaussNewtonModule
from pc_lightning.optim.gauss_newton import GaussNewtonModel, cross_entropy_hvp
from pc_lightning.train import train

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
    cfg = tiny_cfg(name=name, **{"optim.name": name, "optim.inner_steps": 2, "trainer.max_steps": 2,
                                 "trainer.log_every": 1, "trainer.val_every": 2})
    result = train(cfg, quiet=True)
    assert result.status == "finished" and result.step == 2
    run = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_run(result.run_id)
    metrics = run.data.metrics
    for key in ("train/loss", "gn/outer_step", "gn/inner_steps", "gn/alpha", "gn/model_loss", "gn/true_loss",
                "val/loss"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["gn/alpha"] in cfg.optim.line_search
    groups = 1 if name == "gn" else cfg.model.n_layers + 1
    assert metrics["gn/inner_steps"] == 2 * groups
