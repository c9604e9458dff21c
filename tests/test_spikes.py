"""Spike detection (OLMo-core rule), its skip and rollback actions, and the monitors' MLflow metrics."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.callbacks.spike_detection import SpikeDetection, SpikeRule, find_spikes
from pc_lightning.config import SpikeConfig
from pc_lightning.train import train
from helpers import StopAt, assert_identical, assert_same_training_state


# ---------------------------------------------------------------------------------------------- the rule
def noisy_loss(n: int, seed: int) -> np.ndarray:
    """A decaying loss curve with 2% multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (3.0 + 5.0 * np.exp(-t / 300)) * (1 + 0.02 * rng.standard_normal(n))


def test_rule_finds_every_planted_spike_and_nothing_else():
    trace = noisy_loss(3000, seed=0)
    planted = [150, 400, 401, 900, 1500, 2200, 2999]
    for i in planted:
        trace[i] *= 2.0  # ~50 sigma of the noise; early on the window's std also holds the steep decay
    assert find_spikes(trace) == planted


@pytest.mark.parametrize("seed", range(5))
def test_rule_finds_nothing_in_a_clean_noisy_trace(seed):
    assert find_spikes(noisy_loss(3000, seed)) == []
    assert find_spikes(np.abs(np.random.default_rng(seed).normal(1.0, 0.1, 3000))) == []  # a grad-norm-like trace


def test_rule_uses_history_before_the_step_and_waits_for_warmup():
    rule = SpikeRule(window=8, warmup=4, sigmas=6.0)
    for x in (1.0, 3.0, 1.0):
        assert rule.observe(x) == 0.0  # fewer than warmup values: no verdict
    assert rule.observe(3.0) == 0.0
    # history [1, 3, 1, 3]: mean 2, population std 1; the value itself is not in the statistics
    assert rule.observe(9.0) == pytest.approx(7.0)
    assert rule.is_spike(7.0) and not rule.is_spike(6.0)
    assert list(rule.history) == [1.0, 3.0, 1.0, 3.0, 9.0]  # spikes join the history (OLMo-core)
    for x in range(10):
        rule.observe(float(x))
    assert len(rule.history) == 8  # the window


def test_rule_ignores_values_below_the_mean_and_non_finite_values_are_spikes():
    rule = SpikeRule(window=8, warmup=2, sigmas=6.0)
    rule.observe(1.0), rule.observe(2.0)
    assert not rule.is_spike(rule.observe(-100.0))
    assert rule.is_spike(rule.observe(float("inf")))
    assert all(np.isfinite(rule.history))


# ---------------------------------------------------------------------------------------------- actions in a run
SPIKE_STEP = 7
SPIKE_KEYS = {"monitor.spike.window": 8, "monitor.spike.warmup": 4, "trainer.max_steps": 10,
              "trainer.val_every": 10, "trainer.checkpoint_every": 10}


class BlowUpGradients(L.Callback):
    """Multiplies every gradient by 1e4 at one step: a grad-norm spike the rule must catch."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.mul_(1e4)


class Snapshot(L.Callback):
    """Parameters and optimizer state just before and just after one optimizer step."""

    def __init__(self, step: int):
        self.step = step
        self.before = self.after = None

    @staticmethod
    def take(trainer, pl_module) -> dict:
        return {"params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optim": copy.deepcopy(trainer.optimizers[0].state_dict())}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self.take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self.take(trainer, pl_module)


def spike_callback(action: str, **extra) -> SpikeDetection:
    return SpikeDetection(SpikeConfig(enabled=True, window=8, warmup=4, action=action, **extra))


def test_skip_leaves_parameters_and_optimizer_state_bit_identical(tiny_cfg):
    spikes, skipped, normal = spike_callback("skip"), Snapshot(SPIKE_STEP), Snapshot(SPIKE_STEP - 1)
    result = train(tiny_cfg(name="skip", **SPIKE_KEYS),
                   extra_callbacks=[skipped, normal, BlowUpGradients(SPIKE_STEP), spikes], quiet=True)
    assert result.status == "finished" and result.step == 10
    assert SPIKE_STEP in spikes.spike_steps
    assert_identical(skipped.before["params"], skipped.after["params"])
    assert_identical(skipped.before["optim"]["state"], skipped.after["optim"]["state"])  # moments and step counts
    # only the scheduled learning rate moves on: the skipped step still counts as spent
    without_lr = [{k: v for k, v in g.items() if k != "lr"} for g in skipped.before["optim"]["param_groups"]]
    assert without_lr == [{k: v for k, v in g.items() if k != "lr"} for g in skipped.after["optim"]["param_groups"]]
    # an ordinary step does change both (so the comparison above can fail)
    assert not torch.equal(normal.before["params"]["model.lm_head.weight"], normal.after["params"]["model.lm_head.weight"])
    assert normal.before["optim"]["state"][0]["step"] != normal.after["optim"]["state"][0]["step"]


class AfterRollback(L.Callback):
    """Records the parameters right after the spike callback has handled the spike step."""

    def __init__(self, step: int):
        self.step = step
        self.params = self.optim = self.skipped = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self.params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.skipped = trainer.datamodule.skipped_samples


def test_rollback_restores_the_checkpoint_from_before_the_spike_and_skips_data(tiny_cfg):
    spikes = spike_callback("rollback", rollback_steps_back=3, rollback_skip_batches=2)
    after = AfterRollback(SPIKE_STEP)
    result = train(tiny_cfg(name="rollback", **SPIKE_KEYS),
                   extra_callbacks=[BlowUpGradients(SPIKE_STEP), spikes, after], quiet=True)
    assert result.status == "finished" and result.step == 10
    # checkpoints at steps 0, 3, 6; spike at step 7 -> target 7 + 1 - 3 = 5 -> the step-3 checkpoint
    assert spikes.rollbacks == [(SPIKE_STEP, 3)]
    ckpt = torch.load(f"{result.checkpoint_dir}/rollback/step3.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert_identical(after.params, ckpt["state_dict"])
    assert_identical(after.optim["state"], ckpt["optimizer_states"][0]["state"])
    assert after.skipped == 2 * 4  # rollback_skip_batches x batch_size samples
    last = torch.load(f"{result.checkpoint_dir}/last.ckpt", map_location="cpu", weights_only=False)
    (skip,) = last["PretrainDataModule"]["skips"]  # a resume keeps the shifted data stream
    assert skip[1] == 8 and skip[0] >= (SPIKE_STEP + 1) * 4  # from the first window not drawn at the spike


class LearningRateOfEachStep(L.Callback):
    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def test_after_a_rollback_the_next_step_uses_the_scheduled_learning_rate(tiny_cfg):
    """The restored optimizer state holds the checkpoint step's learning rate; the step after the rollback uses the
    schedule's rate for its own step, as the schedule keeps running."""
    from pc_lightning.optim.schedule import lr_multiplier

    cfg = tiny_cfg(name="rollback-lr", **SPIKE_KEYS)
    lrs = LearningRateOfEachStep()
    spikes = spike_callback("rollback", rollback_steps_back=3, rollback_skip_batches=2)
    train(cfg, extra_callbacks=[BlowUpGradients(SPIKE_STEP), spikes, lrs], quiet=True)
    assert spikes.rollbacks == [(SPIKE_STEP, 3)]
    for step in (SPIKE_STEP + 1, SPIKE_STEP + 2):
        assert lrs.lrs[step] == pytest.approx(cfg.optim.lr * lr_multiplier(step, 10, cfg.optim)), step


def test_resume_after_a_rollback_reads_the_windows_of_the_uninterrupted_run(tiny_cfg):
    """The skip is registered at the first window the loader has not drawn yet (the step after the spike was
    already prefetched): a run stopped right after the rollback and resumed ends where the uninterrupted one does."""
    keys = {**SPIKE_KEYS, "trainer.checkpoint_every": 1}
    rollback = {"rollback_steps_back": 3, "rollback_skip_batches": 2}
    straight = train(tiny_cfg(name="rollback-straight", **keys),
                     extra_callbacks=[BlowUpGradients(SPIKE_STEP), spike_callback("rollback", **rollback)], quiet=True)
    spikes = spike_callback("rollback", **rollback)
    first = train(tiny_cfg(name="rollback-split", **keys),
                  extra_callbacks=[BlowUpGradients(SPIKE_STEP), spikes, StopAt(SPIKE_STEP + 1)], quiet=True)
    assert spikes.rollbacks == [(SPIKE_STEP, 3)] and first.step == SPIKE_STEP + 1
    resumed = train(tiny_cfg(name="rollback-split", **keys), resume="last",
                    extra_callbacks=[spike_callback("rollback", **rollback)], quiet=True)
    assert resumed.step == straight.step == 10
    load = lambda result: torch.load(f"{result.checkpoint_dir}/last.ckpt", map_location="cpu", weights_only=False)
    assert_same_training_state(load(straight), load(resumed))


# ---------------------------------------------------------------------------------------------- monitors in MLflow
class HookCount(L.Callback):
    """Forward hooks on one linear layer at each step's first micro-batch (after the monitor attached them)."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts[trainer.global_step] = len(pl_module.model.blocks[0].attn.q._forward_hooks)


def test_monitors_log_their_metrics_to_mlflow(tiny_cfg):
    keys = {"monitor.every": 2, "monitor.activation_norms": True, "monitor.attn_logits": True,
            "monitor.log_z": True, "monitor.embed_std": True, "monitor.grad_norms": True,
            "monitor.spike.enabled": True, "monitor.spike.window": 4, "monitor.spike.warmup": 2}
    hooks = HookCount()
    cfg = tiny_cfg(name="monitors", **keys)
    result = train(cfg, extra_callbacks=[hooks], quiet=True)
    assert result.status == "finished"
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    run = client.get_run(result.run_id)
    expected = ["act/qkv/l2", "act/proj/l2", "act/fc1/l2", "act/fc2/l2", "act/blocks.0.attn.q/l2",
                "act/blocks.1.mlp.down/l2", "attn/max_logit/0", "attn/max_logit/1", "logits/log_z", "embed/std",
                "grad/norm", "grad/norm/qkv", "grad/norm/proj", "grad/norm/fc1", "grad/norm/fc2",
                "grad/norm/embed", "grad/norm/head", "spike/count"]
    for key in expected:
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(result.run_id, "attn/max_logit/0")] == [0, 2, 4]
    assert [m.step for m in client.get_metric_history(result.run_id, "grad/norm")] == [0, 2, 4]
    assert "spike.steps" in run.data.tags
    # hooks exist only on sampled steps
    assert hooks.counts[0] == 1 and hooks.counts[2] == 1
    assert hooks.counts[1] == 0 and hooks.counts[3] == 0


def test_monitors_off_register_nothing(tiny_cfg):
    from pc_lightning.callbacks.registry import configured_callbacks

    from pc_lightning.callbacks.activation_monitor import ActivationMonitor
    from pc_lightning.callbacks.grad_monitor import GradNormMonitor

    mine = (ActivationMonitor, GradNormMonitor, SpikeDetection)
    assert not [c for c in configured_callbacks(tiny_cfg(), module=None) if isinstance(c, mine)]


@pytest.mark.parametrize("key, value", [("monitor.spike.rollback_steps_back", 0),
                                        ("monitor.spike.rollback_skip_batches", -1)])
def test_rollback_settings_are_validated(tiny_cfg, key, value):
    from pc_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        tiny_cfg(**{key: value})


def test_skip_with_fp16_grad_scaler_is_refused(tiny_cfg):
    from pc_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="monitor.spike.action"):
        tiny_cfg(**{"monitor.spike.enabled": True, "monitor.spike.action": "skip", "trainer.precision": "16-mixed"})
