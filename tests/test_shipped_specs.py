"""Every shipped ablation and sweep file composes valid run configs (lightning-hydra-template's "instantiate
every config"): a typo in a preset name, an override key or a search-space path fails here, not hours into a run.
"""

from __future__ import annotations

import glob
import os

import optuna
import pytest

from pc_lightning.config import validate
from pc_lightning.sweep.ablation import combinations, load_ablation, run_config
from pc_lightning.sweep.space import build_pruner, build_sampler, compose_config, load_spec, suggest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "conf", "ablation", "*.yaml")))
SWEEPS = sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml")))


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_every_ablation_run_config_validates(path):
    spec = load_ablation(path)
    combos = combinations(spec)
    assert combos
    names = set()
    for combo in combos:
        cfg = run_config(spec, combo, [], parent_id=None)
        validate(cfg)
        names.add(cfg.name)
    assert len(names) == len(combos), "two runs of one ablation share a name (and so a checkpoint directory)"


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_every_sweep_samples_valid_configs(path):
    spec = load_spec(path)
    build_sampler(spec), build_pruner(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction=spec.objective.direction)
    for _ in range(5):
        trial = study.ask()
        cfg = compose_config(spec.base, list(spec.overrides) + suggest(trial, spec))
        validate(cfg)
        study.tell(trial, 0.0)


def test_workers_of_one_study_get_different_sampler_seeds():
    """--worker-index (commands joining one study) and the local worker number both offset the sampler seed."""
    spec = load_spec(SWEEPS[0])
    spec.sampler.name, spec.sampler.seed = "random", 0
    first = {}
    for worker in (0, 1, 1000):
        study = optuna.create_study(sampler=build_sampler(spec, worker), direction=spec.objective.direction)
        first[worker] = tuple(suggest(study.ask(), spec))
    assert len(set(first.values())) == 3
