"""Update and optimizer-state diagnostics: ||dW|| / ||W|| per group, AdamW's second-moment RMS, and the spike rule
on the update ratio."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.callbacks.grad_monitor import parameter_kinds
from pc_lightning.callbacks.registry import configured_callbacks
from pc_lightning.callbacks.update_monitor import UpdateMonitor, UpdateRatio
from pc_lightning.config import ConfigError, ModelConfig
from pc_lightning.model.llama import Llama
from pc_lightning.train import train


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16))


def test_a_known_sgd_step_gives_the_expected_ratio_per_group():
    """SGD with a fixed gradient moves W by -lr g: the ratio of a group is lr ||g_group|| / ||W_group||."""
    model = tiny_model()
    params = list(model.parameters())
    kinds = parameter_kinds(model)
    tracker = UpdateRatio(params, [kinds[id(p)] for p in params])
    grads = {id(p): torch.randn_like(p) for p in params}
    before = {id(p): p.detach().clone() for p in params}
    lr = 0.01
    tracker.snapshot()
    for p in params:
        p.grad = grads[id(p)]
    torch.optim.SGD(params, lr=lr).step()
    total, per_kind = tracker.ratios()

    def norm(ts):
        return torch.cat([t.reshape(-1) for t in ts]).norm()

    assert set(tracker.kind_names) == {"qkv", "proj", "fc1", "fc2", "embed", "head", "norm"}
    for kind, ratio in zip(tracker.kind_names, per_kind.tolist()):
        mine = [id(p) for p in params if kinds[id(p)] == kind]
        expected = lr * norm([grads[i] for i in mine]) / norm([before[i] for i in mine])
        assert ratio == pytest.approx(float(expected), rel=1e-5), kind
    expected_total = lr * norm(list(grads.values())) / norm(list(before.values()))
    assert float(total) == pytest.approx(float(expected_total), rel=1e-5)
    # the buffers are reused: a second snapshot and no step gives zero
    tracker.snapshot()
    total, per_kind = tracker.ratios()
    assert float(total) == 0.0 and per_kind.abs().max() == 0.0


def test_a_parameter_whose_shape_changed_is_left_out():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3, 3))
    tracker = UpdateRatio([a, b], ["norm", "qkv"])
    tracker.snapshot()
    with torch.no_grad():
        a.add_(1.0)  # ratio 1 for the norm group
        b.data = torch.ones(3, 2)  # a TSVD-like resize
    total, per_kind = tracker.ratios()
    assert per_kind.tolist() == [0.0, 1.0]  # kind order: qkv, norm
    assert float(total) == pytest.approx(1.0)


class BeforeAfter(L.Callback):
    """Parameters and AdamW state around optimizer step ``step`` (read where the monitor reads them)."""

    def __init__(self, step: int):
        self.step = step
        self.before = self.after = self.state = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1 and self.after is None:
            self.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
            opt = trainer.optimizers[0]
            names = {id(p): n for n, p in pl_module.model.named_parameters()}
            self.state = {names[id(p)]: s["exp_avg_sq"].clone() for p, s in opt.state.items()}
            self.kinds = {n: parameter_kinds(pl_module.model)[id(p)] for n, p in pl_module.model.named_parameters()}


def test_the_monitor_logs_the_ratios_and_second_moments_of_the_sampled_steps(tiny_cfg):
    probe = BeforeAfter(step=4)
    cfg = tiny_cfg(name="updates", **{"monitor.update_norms": True, "monitor.every": 2})
    result = train(cfg, extra_callbacks=[probe], quiet=True)
    assert result.status == "finished"
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    assert [m.step for m in client.get_metric_history(result.run_id, "update/ratio/qkv")] == [0, 2, 4]
    logged = {key: {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
              for key in client.get_run(result.run_id).data.metrics}
    for kind in ("qkv", "proj", "fc1", "fc2", "embed", "head", "norm"):
        names = [n for n, k in probe.kinds.items() if k == kind]
        delta = torch.cat([(probe.after[n] - probe.before[n]).reshape(-1) for n in names]).norm()
        weight = torch.cat([probe.before[n].reshape(-1) for n in names]).norm()
        assert logged[f"update/ratio/{kind}"][4] == pytest.approx(float(delta / weight), rel=1e-4), kind
        v = torch.cat([probe.state[n].reshape(-1) for n in names])
        assert logged[f"optim/exp_avg_sq_rms/{kind}"][4] == pytest.approx(float(v.square().mean().sqrt()), rel=1e-4)
    delta = torch.cat([(probe.after[n] - probe.before[n]).reshape(-1) for n in probe.before]).norm()
    weight = torch.cat([probe.before[n].reshape(-1) for n in probe.before]).norm()
    assert logged["update/ratio"][4] == pytest.approx(float(delta / weight), rel=1e-4)


class ShoveWeights(L.Callback):
    """At one step, moves every block matrix by half its value between the snapshot and the update: an update-ratio
    spike that neither the loss nor the gradient norm of that step shows."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for name, p in pl_module.model.named_parameters():
                    if name.startswith("blocks.") and p.ndim == 2:
                        p.mul_(1.5)


@pytest.mark.slow
def test_the_spike_rule_fires_on_an_injected_update_spike(tiny_cfg):
    keys = {"monitor.spike.enabled": True, "monitor.spike.signals": ["update_ratio"], "monitor.spike.window": 8,
            "monitor.spike.warmup": 4, "trainer.max_steps": 10, "trainer.val_every": 10,
            "trainer.checkpoint_every": 10}
    cfg = tiny_cfg(name="update-spike", **keys)
    result = train(cfg, extra_callbacks=[ShoveWeights(7)], quiet=True)
    assert result.status == "finished"
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    run = client.get_run(result.run_id)
    assert run.data.tags["spike.steps"] == "7"
    (z,) = client.get_metric_history(result.run_id, "spike/z_update")
    assert z.step == 7 and z.value > 6
    assert "spike/z_loss" not in run.data.metrics and "spike/z_grad" not in run.data.metrics  # not watched
    # without the update signal the same run sees no spike at that step
    quiet = train(tiny_cfg(name="update-spike-off", **{**keys, "monitor.spike.signals": ["loss", "grad_norm"]}),
                  extra_callbacks=[ShoveWeights(7)], quiet=True)
    assert "7" not in client.get_run(quiet.run_id).data.tags["spike.steps"].split(",")


@pytest.mark.slow
def test_gauss_newton_runs_the_update_monitor_and_the_spike_rule(tiny_cfg):
    """The outer step is the update; the spike rule reads Gauss-Newton's logged loss (it runs no backward)."""
    cfg = tiny_cfg(name="gn-updates", **{"optim.name": "gn", "optim.gn.inner_steps": 2, "trainer.max_steps": 4,
                                         "monitor.every": 1, "monitor.update_norms": True,
                                         "monitor.spike.enabled": True, "monitor.spike.window": 4,
                                         "monitor.spike.warmup": 2,
                                         "monitor.spike.signals": ["loss", "grad_norm", "update_ratio"]})
    result = train(cfg, quiet=True)
    assert result.status == "finished"
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    ratios = client.get_metric_history(result.run_id, "update/ratio")
    assert [m.step for m in ratios] == [0, 1, 2, 3] and all(m.value > 0 for m in ratios)
    assert "spike.steps" in client.get_run(result.run_id).data.tags


def test_skip_with_the_update_signal_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="monitor.spike.signals"):
        tiny_cfg(**{"monitor.spike.enabled": True, "monitor.spike.action": "skip",
                    "monitor.spike.signals": ["loss", "update_ratio"]})
    with pytest.raises(ConfigError, match="monitor.spike.signals"):
        tiny_cfg(**{"monitor.spike.signals": []})
    with pytest.raises(ConfigError, match="monitor.spike.signals"):
        tiny_cfg(**{"monitor.spike.signals": ["loss", "loss"]})
    with pytest.raises(ConfigError, match="monitor.update_norms"):
        tiny_cfg(**{"monitor.update_norms": True, "trainer.strategy": "fsdp"})


def test_off_registers_nothing_and_on_registers_what_is_needed(tiny_cfg):
    def monitors(**keys):
        return [c for c in configured_callbacks(tiny_cfg(**keys), module=None) if isinstance(c, UpdateMonitor)]

    assert monitors() == []
    assert monitors(**{"monitor.spike.enabled": True}) == []  # the default signals do not need it
    (logging,) = monitors(**{"monitor.update_norms": True})
    assert logging.log and not logging.every_step
    (spike,) = monitors(**{"monitor.spike.enabled": True, "monitor.spike.signals": ["update_ratio"]})
    assert spike.every_step and not spike.log
