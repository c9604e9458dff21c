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


# The PC reference's released configs pair the polynomial level with the optimizer: level 4 in its AdamW runs,
# level 2 in its Muon runs (AdamW_pc_1B / Muon_pc_1B). Written out here, not read from the code under test.
REFERENCE_LEVEL = {"adamw": 4, "muon": 2}


def shipped_pc_runs():
    """(file, run, optimizer name, resolved level) of every PC run the shipped ablations and sweeps make, except
    sweeps that search the level themselves."""
    out = []
    for path in ABLATIONS:
        spec = load_ablation(path)
        for combo in combinations(spec):
            cfg = run_config(spec, combo, [], parent_id=None)
            if cfg.model.linear == "pc":
                out.append((os.path.basename(path), combo.key, cfg.optim.name, cfg.model.pc.level))
    for path in SWEEPS:
        spec = load_spec(path)
        if "model.pc.level" in spec.parameters:
            continue
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for i in range(3):
            cfg = compose_config(spec.base, list(spec.overrides) + suggest(study.ask(), spec))
            if cfg.model.linear == "pc":
                out.append((os.path.basename(path), f"trial {i}", cfg.optim.name, cfg.model.pc.level))
    return out


def test_every_shipped_pc_run_uses_the_reference_level_of_its_optimizer():
    runs = shipped_pc_runs()
    assert any(name == "muon" for _, _, name, _ in runs), "no shipped PC + Muon run left to check"
    wrong = [run for run in runs if run[3] != REFERENCE_LEVEL[run[2]]]
    assert not wrong, f"PC runs not at the reference's level for their optimizer: {wrong}"
