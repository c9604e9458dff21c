"""Config errors stop before training with one message naming the key; presets compose; overrides type-check."""

from __future__ import annotations

import glob
import os

import pytest

from pc_lightning.config import ConfigError, load_config, load_yaml_with_defaults, parse, save_yaml, to_dict

ROOT = os.path.dirname(os.path.dirname(__file__))
BASELINE = os.path.join(ROOT, "conf", "baseline.yaml")


def test_baseline_composes_presets():
    cfg = load_config(BASELINE)
    assert cfg.model.name == "tiny" and cfg.model.d_model == 128
    assert cfg.data.source == "bible" and cfg.optim.name == "adamw" and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.d_modle=64", "model.d_modle"),  # unknown key (typo)
        ("optim.lr=-1e-3", "optim.lr"),  # bad value
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("model.n_layers=2.5", "model.n_layers"),  # wrong type
        ("model.n_heads=3", "model.n_heads"),  # does not divide d_model
        ("data.seq_len=4096", "data.seq_len"),  # beyond the RoPE table
        ("model.linear=sparse", "model.linear"),  # not one of the choices
        ("trainer.progress_bar=maybe", "trainer.progress_bar"),
        ("nonsense.key=1", "nonsense"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(BASELINE, [override])
    assert err.value.key == key
    assert key in str(err.value)


def test_vocab_larger_than_tokenizer_is_rejected_before_training(tiny_cfg):
    from pc_lightning.train import train

    cfg = tiny_cfg(**{"model.vocab_size": 100000})
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.key == "model.vocab_size"


def test_overrides_are_typed():
    cfg = load_config(BASELINE, ["optim.lr=1e-3", "trainer.max_steps=5", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.trainer.max_steps == 5 and cfg.optim.betas == [0.8, 0.9]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(BASELINE, ["model.attn_norm=qk_norm"])
    path = save_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)


EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml")) +
                     glob.glob(os.path.join(ROOT, "conf", "experiment", "*.yaml")))
PRESETS = sorted(p for p in glob.glob(os.path.join(ROOT, "conf", "*", "*.yaml"))
                 if os.path.basename(os.path.dirname(p)) not in ("experiment", "ablation"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_loads_and_validates(path):
    load_config(path)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_preset_has_known_keys_and_types(path):
    parse(load_yaml_with_defaults(path))


def test_cli_reports_config_error(capsys):
    from pc_lightning.cli import main

    assert main(["train", "--config", BASELINE, "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_takes_options_after_overrides():
    from pc_lightning.cli import parse_args

    args = parse_args(["sweep", "s.yaml", "a.b=1", "--storage", "sqlite:///x.db", "c.d=2", "--worker-index", "3"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.storage == "sqlite:///x.db" and args.worker_index == 3
    args = parse_args(["train", "--config", BASELINE, "optim.lr=1e-3", "--resume", "last", "model.d_model=64"])
    assert args.overrides == ["optim.lr=1e-3", "model.d_model=64"] and args.resume == "last"
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", BASELINE, "--no-such-option"])
    with pytest.raises(SystemExit):
        parse_args(["merge", "ckpt", "stray=1"])


def test_checkpoint_dir_defaults_to_the_results_dir(results_dir):
    """``trainer.checkpoint_dir`` defaults to ``$PCL_RESULTS_DIR/checkpoints``, the folder MLflow and Optuna use."""
    cfg = load_config(os.path.join(ROOT, "conf", "baseline.yaml"))
    assert cfg.trainer.checkpoint_dir == str(results_dir / "checkpoints")
