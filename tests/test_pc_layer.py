"""PC layer (Wang et al., arXiv 2606.06470): the polynomial, the power iteration, the once-per-step gradient."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from pc_lightning.callbacks.pc_step import PCStep
from pc_lightning.callbacks.spectrum_monitor import spectrum_metrics
from pc_lightning.config import ConfigError, PCConfig
from pc_lightning.layers.pc_linear import PCLinear, effective_weights, power_iteration
from pc_lightning.layers.pc_polynomial import PC_COEFFICIENTS, apply_polynomial, scalar_polynomial
from pc_lightning.train import train

LEVELS = sorted(PC_COEFFICIENTS)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("level", LEVELS)
def test_polynomial_maps_singular_values(shape, level):
    gen = torch.Generator().manual_seed(level)
    w = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    w_hat = w / torch.linalg.matrix_norm(w, ord=2)[:, None, None]  # singular values in [0, 1]
    got = torch.linalg.svdvals(apply_polynomial(w_hat, level))
    want = scalar_polynomial(torch.linalg.svdvals(w_hat), level).sort(dim=-1, descending=True).values
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # one matrix alone gives the same as its slice of the batch
    torch.testing.assert_close(apply_polynomial(w_hat[1], level), apply_polynomial(w_hat, level)[1])


@pytest.mark.parametrize("level", LEVELS)
def test_polynomial_keeps_one_and_lifts_small_values(level):
    sigma = torch.tensor([1.0, 0.3], dtype=torch.float64)
    g = scalar_polynomial(sigma, level)
    assert abs(float(g[0]) - 1.0) < 1e-9
    expected = {0: 0.3, 1: 0.44, 2: 0.58, 3: 0.76, 4: 0.87}[level]  # the reference's polynomials (docs/pc.md)
    assert abs(float(g[1]) - expected) < 0.01


def test_power_iteration_converges_to_top_singular_value():
    torch.manual_seed(0)
    layer = PCLinear(20, 12, PCConfig(level=4, power_iters=5)).double()
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(torch.randn(12, 20, dtype=torch.float64), full_matrices=False)
        layer.weight.copy_(u @ torch.diag(torch.linspace(3.0, 0.5, 12, dtype=torch.float64)) @ vh)
    for _ in range(10):  # warm-started: a few steps per optimizer step add up
        power_iteration([layer])
    sigma = float(layer.u @ layer.weight.detach() @ layer.v)
    assert sigma == pytest.approx(3.0, rel=1e-6)


def test_effective_weight_formula_and_gamma():
    torch.manual_seed(0)
    cfg = PCConfig(level=2, gamma_init=0.5)
    layer = PCLinear(8, 12, cfg).double()
    layer.init_weights(0.1)
    w = layer.weight.detach()
    sigma = torch.linalg.matrix_norm(w, ord=2)
    want = 0.5 * sigma * apply_polynomial(w / sigma, 2)
    torch.testing.assert_close(layer.effective_weight().double(), want, rtol=1e-5, atol=1e-7)
    assert isinstance(layer.gamma, nn.Parameter)
    fixed = PCLinear(8, 12, PCConfig(level=4, learnable_gamma=False))
    assert "gamma" in dict(fixed.named_buffers()) and "gamma" not in dict(fixed.named_parameters())


class PCStack(L.LightningModule):
    """Two same-shape PC layers and one of another shape, with a quadratic loss (fp64)."""

    def __init__(self):
        super().__init__()
        cfg = PCConfig(level=4, power_iters=3)
        self.a, self.b, self.c = PCLinear(6, 8, cfg), PCLinear(6, 8, cfg), PCLinear(8, 5, cfg)
        for layer in (self.a, self.b, self.c):
            layer.init_weights(0.3)
        self.double()

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)) * self.b(x))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class GradCapture(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def test_once_per_step_gradient_equals_per_forward_autograd(tmp_path):
    torch.manual_seed(0)
    module = PCStack()
    reference = copy.deepcopy(module)
    batches = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]

    power_iteration([reference.a, reference.b, reference.c])  # what PCStep does at the step's start
    loss = sum(reference.training_step(x, i) / 2 for i, x in enumerate(batches))  # Lightning scales by 1/accum
    loss.backward()

    capture = GradCapture()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, precision="64-true", accelerator="cpu",
                        callbacks=[PCStep(), capture], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(capture.grads[name], p.grad, rtol=1e-10, atol=1e-12)
    assert any("gamma" in n for n in capture.grads)
    assert all(layer.step_weight is None for layer in (module.a, module.b, module.c))  # cache dropped


def test_bf16_matmuls_switch_changes_only_the_polynomial_precision():
    torch.manual_seed(0)
    layer = PCLinear(32, 48, PCConfig(level=4))
    layer.init_weights(0.02)
    exact = layer.effective_weight().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = effective_weights([layer])[0].detach()
    assert exact.dtype == low.dtype == torch.float32
    rel = float((low - exact).abs().max() / exact.abs().max())
    assert 0 < rel < 0.1


def test_pc_config_validation(tiny_cfg):
    with pytest.raises(ConfigError, match="model.pc.eps"):
        tiny_cfg(**{"model.linear": "pc", "model.pc.eps": 0.0})
    with pytest.raises(ConfigError, match="model.pc.gamma_init"):
        tiny_cfg(**{"model.pc.learnable_gamma": False, "model.pc.gamma_init": 0.0})
    with pytest.raises(ConfigError, match="model.pc.level"):
        tiny_cfg(**{"model.pc.level": 5})


@pytest.mark.parametrize("optimizer,level", [("adamw", 4), ("muon", 2)])
def test_reference_presets_match_the_reference_and_differ_from_their_baselines_only_in_pc_flags(optimizer, level):
    """conf/experiment/{pc,baseline}-reference-{adamw,muon}.yaml: the PC reference's released 1B settings (as far
    as the suite's model goes) at the tiny size; the PC run is its baseline plus PC flags."""
    import os

    from pc_lightning.config import flatten, load_config, to_dict
    from pc_lightning.sweep.space import compose_config

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf", "experiment")
    pc = load_config(os.path.join(root, f"pc-reference-{optimizer}.yaml"))
    base = load_config(os.path.join(root, f"baseline-reference-{optimizer}.yaml"))
    o = pc.optim
    assert (o.name, o.warmup_fraction, o.min_lr_ratio, o.grad_clip, o.betas, o.eps) == (optimizer, 0.01, 0.1, 1.0,
                                                                                       [0.9, 0.95], 1e-8)
    assert o.weight_decay == 0.1 and o.decay_all
    assert pc.model.init == "torchtitan" and pc.model.name == "tiny"
    if optimizer == "muon":
        assert o.lr == o.muon.adamw_lr == 1.5e-3 and o.muon.adjust_lr_fn == "match_rms_adamw"
        assert (o.muon.momentum, o.muon.nesterov, o.muon.ns_steps) == (0.95, True, 5)
    else:
        assert o.lr == 3e-4
    assert pc.model.linear == "pc" and base.model.linear == "dense"
    assert (pc.model.pc.level, pc.model.pc.eps, pc.model.pc.power_iters, pc.model.pc.targets) == (
        level, 1e-7, 10, ["ffn", "attn_out"])
    differ = {k for k, v in flatten(to_dict(pc)).items() if flatten(to_dict(base))[k] != v}
    assert differ <= {"name", "model.linear", "model.pc.eps", "model.pc.level"}, differ
    # scaling up: the presets compose with the 1B model preset
    big = compose_config(os.path.join(root, f"pc-reference-{optimizer}.yaml"), ["model/1b", "data.seq_len=2048"])
    assert (big.model.d_model, big.model.n_layers, big.model.init, big.model.pc.level) == (2048, 18, "torchtitan",
                                                                                          level)


@pytest.mark.parametrize("overrides,level", [
    ({}, 4), ({"optim.name": "muon"}, 2), ({"optim.name": "soap"}, 4),
    ({"optim.name": "gn"}, 4), ({"optim.name": "gn", "optim.gn.inner_optimizer": "muon"}, 2),
    ({"optim.name": "muon", "model.pc.level": 4}, 4), ({"optim.name": "adamw", "model.pc.level": 2}, 2),
    ({"optim.name": "muon", "model.pc.level": 0}, 0),
], ids=["adamw", "muon", "soap", "gn-adamw", "gn-muon", "muon-explicit-4", "adamw-explicit-2", "muon-explicit-0"])
def test_pc_level_resolves_to_the_reference_level_of_the_optimizer(tiny_cfg, overrides, level):
    """model.pc.level unset (null) = the reference's level for the optimizer that takes the weight steps (Gauss-
    Newton: its inner optimizer); a level the config sets wins. The resolved config records the number."""
    from pc_lightning.config import from_dict, to_dict

    cfg = tiny_cfg(**{"model.linear": "pc", **overrides})
    assert cfg.model.pc.level == level
    assert to_dict(cfg)["model"]["pc"]["level"] == level
    assert from_dict(to_dict(cfg)).model.pc.level == level  # a resolved config re-runs with the same level


def test_pc_layer_refuses_an_unresolved_level():
    with pytest.raises(ValueError, match="model.pc.level"):
        PCLinear(8, 12, PCConfig())


def test_spectrum_metrics_match_svd():
    torch.manual_seed(0)
    from pc_lightning.config import ModelConfig
    from pc_lightning.model import Llama

    model = Llama(ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=64, linear="pc",
                              pc=PCConfig(level=4)))
    metrics = spectrum_metrics(model)
    sv = torch.linalg.svdvals(model.blocks[0].attn.o.effective_weight().detach())
    assert metrics["spectrum/blocks.0.attn.o/top"] == pytest.approx(float(sv[0]), rel=1e-5)
    assert metrics["spectrum/blocks.0.attn.o/cond"] == pytest.approx(float(sv[0] / sv[-1]), rel=1e-4)
    mcns = []
    for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
        s = torch.linalg.svdvals(model.blocks[0].get_submodule(name).effective_weight().detach())
        k = math.ceil(0.1 * len(s))
        mcns.append(float(s[0] / s[-k:].mean()))
    assert metrics["spectrum/gmcn"] == pytest.approx(math.exp(sum(map(math.log, mcns)) / len(mcns)), rel=1e-4)


def test_tiny_pc_model_trains_with_accumulation(tiny_cfg):
    from mlflow.tracking import MlflowClient

    from pc_lightning import tracking

    cfg = tiny_cfg(**{"model.linear": "pc", "trainer.accumulate_grad_batches": 2, "monitor.spectrum": True,
                      "monitor.every": 3, "name": "pc-accum"})
    result = train(cfg, quiet=True)
    assert result.status == "finished" and result.step == 6
    assert math.isfinite(result.metrics["train/loss"]) and math.isfinite(result.metrics["val/loss"])
    history = MlflowClient(tracking.tracking_uri(cfg.tracking)).get_metric_history(
        result.run_id, "spectrum/blocks.0.attn.o/cond")
    assert sorted(m.step for m in history) == [0, 3, 6]
    assert all(m.value >= 1.0 for m in history)


def test_pc_presets_compose():
    import os

    from pc_lightning.config import load_config, load_yaml_with_defaults

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf")
    pc = load_config(os.path.join(root, "pc.yaml"))
    baseline = load_config(os.path.join(root, "baseline.yaml"))
    assert (pc.model.linear, pc.model.pc.level, pc.model.pc.targets) == ("pc", 4, ["ffn", "attn_out"])
    assert pc.trainer.max_tokens == baseline.trainer.max_tokens and pc.name == "pc-tiny"
    assert "level" not in load_yaml_with_defaults(os.path.join(root, "variant", "pc.yaml"))["model"]["pc"]
    # the level follows the optimizer (the reference's pairing) unless the config sets it
    assert load_config(os.path.join(root, "pc.yaml"), ["optim.name=muon"]).model.pc.level == 2
    assert load_config(os.path.join(root, "pc.yaml"), ["optim.name=muon", "model.pc.level=3"]).model.pc.level == 3
