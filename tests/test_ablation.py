"""Ablations: grid runs nested in MLflow, resume, failed combinations, results/<name>/ with seed statistics,
pcl report, LR sensitivity."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from pc_lightning import tracking
from pc_lightning.config import TrackingConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.ablation import run_ablation
from pc_lightning.sweep.lr_sensitivity import lr_sensitivity, max_stable_lr
from pc_lightning.sweep.report import report

ROOT = Path(__file__).resolve().parents[1]


def test_lr_sensitivity_on_a_hand_made_table():
    l0 = math.log(512)
    losses = {1e-3: 3.0, 1e-2: 2.5, 1e-1: None}  # the largest LR diverged: it counts as l0
    assert lr_sensitivity(losses, l0) == pytest.approx((0.5 + 0.0 + (l0 - 2.5)) / 3)
    assert max_stable_lr(losses, l0) == 1e-2
    # a loss above l0 is capped at l0; a recipe equally good at every LR has sensitivity 0
    assert lr_sensitivity({1e-3: 7.0, 1e-2: 2.0}, 6.0) == pytest.approx(2.0)
    assert lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}, 6.0) == 0.0
    assert max_stable_lr({1e-3: float("nan"), 1e-2: 6.5}, 6.0) is None


def children(name: str):
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    return runs.children(client, runs.find_parent(client, "ablation", name))


def test_ablation_writes_results_resumes_and_report_reproduces(tmp_path, data_cache, results_dir, capsys):
    spec = {
        "name": "mini",
        "base": str(ROOT / "conf" / "baseline.yaml"),
        "overrides": tiny_overrides(data_cache, results_dir),
        "variants": {"baseline": [], "qk_norm": ["variant/qk_norm"],
                     # valid config, fails at run time before Lightning starts: recorded as a failed run
                     "broken": ["data.tokenizer_path=/nonexistent/tokenizer.json"]},
        "optimizers": {"adamw": []},
        "seeds": [1, 2],
    }
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    assert run_ablation(str(spec_path)) == 1  # one combination failed, the others ran
    out = results_dir / "mini"
    summary = (out / "summary.md").read_text()
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("baseline", "1", "finished"), ("baseline", "2", "finished"), ("qk_norm", "1", "finished"),
        ("qk_norm", "2", "finished"), ("broken", "1", "failed"), ("broken", "2", "failed")]  # one row per run
    assert all(float(r["final_val_loss"]) < math.log(512) for r in rows[:4])
    # two seeds: mean ± sd over n = 2, and qk_norm against the first variant with a paired t-interval
    losses = [float(r["final_val_loss"]) for r in rows[:2]]
    mean_sd = f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f}"
    assert f"| baseline | adamw | {float(rows[0]['lr']):g} | 2 | {mean_sd} |" in summary
    assert "## Paired differences vs `baseline`" in summary and "95% Student t-interval" in summary
    qk_row = next(line for line in summary.splitlines() if line.startswith("| qk_norm | adamw | 2 |"))
    assert qk_row.count("[") == 2  # Δ final and Δ best val loss, each with its interval
    assert "no confidence interval" not in summary
    assert "## LR grid" not in summary and not (out / "lr_sensitivity.png").exists()  # one LR: no LR statistics
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    assert runs.find_parent(client, "ablation", "mini").data.tags["pcl.reference"] == "baseline"
    assert "`broken|adamw|lr=config|seed=1`: failed" in summary and "`broken|adamw|lr=config|seed=2`" in summary
    assert (out / "loss_curves.png").stat().st_size > 0
    first = {r.info.run_id for r in children("mini")}
    assert len(first) == 6

    # re-running skips the finished runs and retries only the failed one
    capsys.readouterr()
    assert run_ablation(str(spec_path)) == 1
    assert "6 runs, 4 already done, 2 to run" in capsys.readouterr().out
    second = children("mini")
    assert len(second) == 8 and sum(r.data.tags["pcl.variant"] == "broken" for r in second) == 4

    # pcl report re-renders the same summary from MLflow alone
    summary, runs_csv = (out / "summary.md").read_text(), (out / "runs.csv").read_text()
    shutil.rmtree(out)
    assert report("mini") == 0
    assert (out / "summary.md").read_text() == summary
    assert (out / "runs.csv").read_text() == runs_csv
    assert report(str(spec_path)) == 0 and (out / "loss_curves.png").exists()
