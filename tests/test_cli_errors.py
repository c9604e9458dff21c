"""Bad inputs end in one ``pcl: ...`` line on stderr that names the file and what is wrong, and exit code 2."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides
from helpers import ROOT
from pc_lightning import tracking
from pc_lightning.cli import main

BASELINE = str(ROOT / "conf" / "baseline.yaml")


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcl: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(data_cache, tmp_path_factory):
    """A real 3-step run of the tiny model (d_model=32): its last.ckpt, results directory and overrides."""
    results = tmp_path_factory.mktemp("trained") / "results"
    overrides = tiny_overrides(data_cache, results, name="trained", **{"trainer.max_steps": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "RESULTS_DIR", results)
        assert main(["train", "--config", BASELINE, *overrides]) == 0
    (ckpt,) = (results / "checkpoints" / "trained").glob("*/last.ckpt")
    return SimpleNamespace(ckpt=ckpt, results=results, overrides=overrides)


@pytest.fixture()
def truncated(trained, tmp_path):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(trained.ckpt.read_bytes()[:100])
    return path


def test_malformed_yaml_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel:\n  d_model: [32\n  n_layers: 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "not valid YAML" in line and "line 4" in line


def test_hf_source_whose_data_files_do_not_exist(data_cache, results_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    source = {"data.source": "hf", "data.path": "text", "data.data_files": "[/nonexistent/*.txt]"}
    overrides = tiny_overrides(data_cache, results_dir, **{"data.cache_dir": cache, **source})
    assert main(["train", "--config", BASELINE, *overrides]) == 2
    line = one_error_line(capsys)
    assert "data.data_files" in line and "/nonexistent/*.txt" in line
    assert not (results_dir / "mlflow.db").exists()  # stopped before MLflow
    entries = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] if cache.exists() else []
    assert entries == []  # no half-built cache entry


def test_resume_of_a_truncated_checkpoint_stops_before_data_and_mlflow(data_cache, results_dir, truncated, tmp_path,
                                                                       capsys):
    cache = tmp_path / "fresh-cache"
    overrides = tiny_overrides(data_cache, results_dir, **{"data.cache_dir": cache})
    assert main(["train", "--config", BASELINE, *overrides, "--resume", str(truncated)]) == 2
    line = one_error_line(capsys)
    assert str(truncated) in line and "truncated" in line
    assert not cache.exists()  # no data preparation
    assert not (results_dir / "mlflow.db").exists()  # no MLflow run created or reopened


def test_resume_with_another_model_shape_leaves_the_run_and_checkpoint_as_they_were(trained, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RESULTS_DIR", trained.results)
    before = trained.ckpt.read_bytes()
    run_id = torch.load(trained.ckpt, map_location="cpu", weights_only=False)["mlflow_run_id"]
    overrides = [*trained.overrides, "model.d_model=64", "trainer.max_steps=6"]
    assert main(["train", "--config", BASELINE, *overrides, "--resume", str(trained.ckpt)]) == 2
    line = one_error_line(capsys)
    assert str(trained.ckpt) in line and "does not fit the model" in line and "size mismatch" in line
    run = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig())).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"  # not RUNNING, not FAILED
    assert trained.ckpt.read_bytes() == before


def test_merge_of_a_text_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert main(["merge", str(text)]) == 2
    line = one_error_line(capsys)
    assert str(text) in line and "not a PyTorch checkpoint" in line


def test_merge_of_a_truncated_checkpoint(truncated, capsys):
    assert main(["merge", str(truncated)]) == 2
    line = one_error_line(capsys)
    assert str(truncated) in line and "truncated" in line


def test_merge_of_a_missing_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "last.ckpt"
    assert main(["merge", str(missing)]) == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "no such file" in line
