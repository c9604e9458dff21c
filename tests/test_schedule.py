"""Learning-rate schedules (cosine, warmup-stable-decay, constant): values at the phase boundaries, validation,
and a resume that changes the schedule follows the new one from the resumed step."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.config import ConfigError, OptimConfig, WSDConfig
from pc_lightning.optim.schedule import build_scheduler, lr_multiplier
from pc_lightning.train import train
from helpers import assert_same_training_state

N, MIN = 100, 0.1  # total steps; warmup 10 steps (0.1), WSD decay over the last 20 (0.2), from step 80


def multipliers(schedule: str, shape: str = "1-sqrt") -> list[float]:
    cfg = OptimConfig(schedule=schedule, warmup_fraction=0.1, min_lr_ratio=MIN,
                      wsd=WSDConfig(decay_fraction=0.2, decay_shape=shape))
    return [lr_multiplier(step, N, cfg) for step in range(N)]


@pytest.mark.parametrize("schedule, shape", [("cosine", None), ("wsd", "linear"), ("wsd", "1-sqrt"),
                                             ("constant", None)])
def test_schedule_values_at_the_phase_boundaries(schedule, shape):
    m = multipliers(schedule, shape or "1-sqrt")
    # warmup: linear, its last step (9) at the peak
    assert m[0] == pytest.approx(0.1) and m[4] == pytest.approx(0.5) and m[9] == 1.0
    if schedule == "cosine":
        assert m[10] == 1.0  # the decay starts right after the warmup
        assert m[55] == pytest.approx(MIN + (1 - MIN) * 0.5)  # half way
        assert m[99] == pytest.approx(MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    elif schedule == "constant":
        assert set(m[9:]) == {1.0}
    else:
        assert set(m[9:80]) == {1.0}  # stable until the decay starts at step N - 20
        first = 1 - 1 / 20 if shape == "linear" else 1 - math.sqrt(1 / 20)
        assert m[80] == pytest.approx(MIN + (1 - MIN) * first)  # the first decay step is already below the peak
        half = 0.5 if shape == "linear" else 1 - math.sqrt(0.5)
        assert m[89] == pytest.approx(MIN + (1 - MIN) * half)  # progress 10/20
        assert m[99] == pytest.approx(MIN)  # the last step reaches min_lr_ratio
        assert all(a > b for a, b in zip(m[79:], m[80:]))  # strictly decreasing through the decay


def test_one_minus_sqrt_cools_down_faster_than_linear_and_no_schedule_goes_below_min():
    linear, root = multipliers("wsd", "linear"), multipliers("wsd", "1-sqrt")
    assert all(r < lin for r, lin in zip(root[80:99], linear[80:99]))
    for schedule in ("cosine", "wsd", "constant"):
        assert min(multipliers(schedule)) >= MIN - 1e-12


def test_the_scheduler_applies_the_multiplier_to_every_group():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 4e-3}])
    cfg = OptimConfig(schedule="wsd", warmup_fraction=0.0, min_lr_ratio=MIN, wsd=WSDConfig(decay_fraction=0.5))
    scheduler = build_scheduler(opt, 4, cfg)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    expected = [lr_multiplier(step, 4, cfg) for step in range(4)]
    assert [lr for pair in seen for lr in pair] == pytest.approx([lr for e in expected for lr in (1e-3 * e, 4e-3 * e)])
    assert expected[-1] == pytest.approx(MIN)


@pytest.mark.parametrize("key, value, where", [
    ("optim.wsd.decay_fraction", 0.0, "optim.wsd.decay_fraction"),
    ("optim.wsd.decay_fraction", 1.5, "optim.wsd.decay_fraction"),
    ("optim.wsd.decay_shape", "cosine", "optim.wsd.decay_shape"),
    ("optim.schedule", "step", "optim.schedule"),
])
def test_schedule_settings_are_validated(tiny_cfg, key, value, where):
    with pytest.raises(ConfigError, match=where):
        tiny_cfg(**{"optim.schedule": "wsd", key: value})


def test_wsd_refuses_a_decay_that_starts_inside_the_warmup(tiny_cfg):
    with pytest.raises(ConfigError, match="optim.wsd.decay_fraction"):
        tiny_cfg(**{"optim.schedule": "wsd", "optim.warmup_fraction": 0.5, "optim.wsd.decay_fraction": 0.6})
    tiny_cfg(**{"optim.schedule": "cosine", "optim.warmup_fraction": 0.5, "optim.wsd.decay_fraction": 0.6})


def test_gauss_newton_takes_wsd_over_outer_steps_but_not_with_a_per_outer_cosine(tiny_cfg):
    tiny_cfg(**{"optim.name": "gn", "optim.schedule": "wsd"})
    with pytest.raises(ConfigError, match="optim.schedule.*per_outer_cosine"):
        tiny_cfg(**{"optim.name": "gn", "optim.schedule": "wsd", "optim.gn.inner_schedule": "per_outer_cosine"})
    tiny_cfg(**{"optim.name": "gn", "optim.schedule": "constant", "optim.gn.inner_schedule": "per_outer_cosine"})


class LearningRates(L.Callback):
    """The learning rate of every parameter group used by each optimizer step."""

    def __init__(self):
        self.by_step: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.by_step[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


@pytest.mark.slow
def test_a_cooldown_resumed_from_a_stable_checkpoint_follows_the_new_schedule(tiny_cfg):
    """A 4-step constant-LR run, resumed with schedule=wsd and max_steps=8 (decay over the last 4 steps), ends in
    exactly the state of an 8-step WSD run: the resumed steps use the new schedule's LRs from the first one on."""
    base = {"optim.warmup_fraction": 0.0, "optim.min_lr_ratio": MIN, "trainer.val_every": 4,
            "trainer.checkpoint_every": 4, "trainer.log_every": 1}
    wsd = {"optim.schedule": "wsd", "optim.wsd.decay_fraction": 0.5, "optim.wsd.decay_shape": "1-sqrt",
           "trainer.max_steps": 8}
    straight = train(tiny_cfg(name="wsd-straight", **base, **wsd), quiet=True)
    stable = train(tiny_cfg(name="wsd-branch", **base, **{"optim.schedule": "constant", "trainer.max_steps": 4}),
                   quiet=True)
    assert stable.step == 4
    lrs = LearningRates()
    cfg = tiny_cfg(name="wsd-branch", **base, **wsd)
    cooldown = train(cfg, resume="last", extra_callbacks=[lrs], quiet=True)
    assert cooldown.step == 8 and cooldown.run_id == stable.run_id
    peak = cfg.optim.lr
    assert sorted(lrs.by_step) == [4, 5, 6, 7]
    for step, group_lrs in lrs.by_step.items():
        assert group_lrs == pytest.approx([peak * lr_multiplier(step, 8, cfg.optim)] * len(group_lrs)), step
    assert lrs.by_step[7][0] == pytest.approx(peak * MIN)
    load = lambda r: torch.load(os.path.join(r.checkpoint_dir, "last.ckpt"), map_location="cpu", weights_only=False)
    assert_same_training_state(load(straight), load(cooldown))
    # the LR monitor shows the shape in MLflow: flat, then the 1-sqrt decay down to min_lr_ratio at the last step
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    history = {m.step: m.value for m in client.get_metric_history(straight.run_id, "lr-AdamW/decay")}
    assert history[0] == pytest.approx(peak) and history[7] == pytest.approx(peak * MIN)
