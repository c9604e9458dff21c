"""Ablations: grid runs nested in MLflow, resume, failed combinations, results/<name>/ with seed statistics,
pcl report, LR sensitivity, a quiet output with progress lines, parallel workers."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from pc_lightning import tracking
from pc_lightning.config import TrackingConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.ablation import combinations, load_ablation, run_ablation
from pc_lightning.sweep.lr_sensitivity import lr_sensitivity, max_stable_lr
from pc_lightning.sweep.report import report
from pc_lightning.sweep.workers import threads_per_worker

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


def write_ablation(path: Path, name: str, data_cache: str, results_dir: Path, **fields) -> Path:
    spec = {"name": name, "base": str(ROOT / "conf" / "baseline.yaml"),
            "overrides": tiny_overrides(data_cache, results_dir), "variants": {"baseline": []},
            "optimizers": {"adamw": []}, "seeds": [1], **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


NOISE = ["GPU available", "TPU available", "💡 Tip", "litlogger", "LeafSpec", "Creating initial MLflow database tables",
         "Updating database tables", "`Trainer.fit` stopped"]


@pytest.mark.slow
def test_ablation_output_is_quiet_with_a_line_per_run(tmp_path, data_cache, results_dir):
    """What ``pcl ablate`` prints to a log file: no library banners, tips or deprecation notices, one line per run
    with runs done / total, elapsed time and an ETA, and where the results went."""
    spec_path = write_ablation(tmp_path / "quiet.yaml", "quiet", data_cache, results_dir,
                               variants={"baseline": [], "qk_norm": ["variant/qk_norm"]})
    env = dict(os.environ, PCL_RESULTS_DIR=str(results_dir))
    done = subprocess.run([sys.executable, "-m", "pc_lightning.cli", "ablate", str(spec_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert [noise for noise in NOISE if noise in output] == []
    lines = done.stdout.splitlines()
    assert lines[0] == "ablation 'quiet': 2 runs, 0 already done, 2 to run"
    run_lines = [line for line in lines if line.startswith("[")]
    assert [line.split(":")[0] for line in run_lines] == ["[1/2] baseline|adamw|lr=config|seed=1",
                                                          "[2/2] qk_norm|adamw|lr=config|seed=1"]
    assert all(re.search(r": finished, val/loss=\d\.\d{4} \(\d+s\) · elapsed \d+:\d\d · ETA \d+:\d\d$", line)
               for line in run_lines), run_lines
    assert run_lines[-1].endswith("ETA 0:00")
    assert lines[-1] == f"ablation 'quiet': summary in {results_dir.resolve() / 'quiet' / 'summary.md'}"
    assert "\r" not in done.stdout  # no live line in a log file


def keys_and_statuses(name: str) -> list[tuple[str, str]]:
    return sorted((r.data.tags["pcl.key"], r.data.tags["status"]) for r in children(name))


@pytest.mark.slow
def test_parallel_ablation_runs_the_same_grid_with_shared_cores(tmp_path, data_cache, results_dir, capsys):
    """--workers 2: the grid's runs, once each, under one parent, as --workers 1 gives them; each worker trains with
    cores // 2 threads unless trainer.num_threads says otherwise; a second invocation runs nothing."""
    fields = {"variants": {"baseline": [], "two_threads": ["trainer.num_threads=2"]}, "seeds": [1, 2]}
    parallel = write_ablation(tmp_path / "par.yaml", "par", data_cache, results_dir, **fields)
    serial = write_ablation(tmp_path / "ser.yaml", "ser", data_cache, results_dir, **fields)

    assert run_ablation(str(parallel), workers=2) == 0
    assert "4 runs, 0 already done, 4 to run in 2 worker processes" in capsys.readouterr().out
    assert run_ablation(str(serial), workers=1) == 0
    assert keys_and_statuses("par") == keys_and_statuses("ser") == sorted(
        (c.key, "finished") for c in combinations(load_ablation(parallel)))
    threads = {r.data.tags["pcl.key"]: r.data.tags["pcl.threads"] for r in children("par")}
    assert threads == {key: str(2 if key.startswith("two_threads") else threads_per_worker(2)) for key in threads}
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    assert runs.find_parent(client, "ablation", "par").info.status == "FINISHED"
    assert (results_dir / "par" / "summary.md").exists()

    capsys.readouterr()
    assert run_ablation(str(parallel), workers=2) == 0
    assert "4 runs, 4 already done, 0 to run" in capsys.readouterr().out
    assert len(children("par")) == 4


@pytest.mark.slow
def test_interrupted_parallel_ablation_resumes(tmp_path, data_cache, results_dir):
    """A Ctrl-C to ``pcl ablate --workers 2`` (sent by a worker at step 3 of its first run, tests/ablation_worker.py)
    stops both workers: their runs end killed, none is left running, the parent is KILLED; the same command then
    runs every combination that has no finished run."""
    spec_path = write_ablation(tmp_path / "int.yaml", "int", data_cache, results_dir,
                               variants={"baseline": [], "qk_norm": ["variant/qk_norm"]}, seeds=[1, 2])
    env = dict(os.environ, PCL_RESULTS_DIR=str(results_dir))
    rc = subprocess.run([sys.executable, str(ROOT / "tests" / "ablation_worker.py"), str(spec_path), "3"], env=env,
                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                        timeout=600).returncode
    assert rc == 130
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    assert runs.find_parent(client, "ablation", "int").info.status == "KILLED"
    interrupted = children("int")
    assert interrupted and all(r.info.status != "RUNNING" for r in interrupted)
    assert "killed" in {r.data.tags["status"] for r in interrupted}
    finished_before = {r.data.tags["pcl.key"] for r in interrupted if r.data.tags["status"] == "finished"}

    assert run_ablation(str(spec_path), workers=2) == 0

    after = children("int")
    grid = {c.key for c in combinations(load_ablation(spec_path))}
    finished = [r.data.tags["pcl.key"] for r in after if r.data.tags["status"] == "finished"]
    assert sorted(finished) == sorted(grid)  # each combination finished exactly once
    assert len(after) == len(interrupted) + len(grid - finished_before)  # only the unfinished ones ran again
    assert runs.find_parent(client, "ablation", "int").info.status == "FINISHED"


def test_explicit_threads_that_oversubscribe_the_workers_are_warned_about():
    from pc_lightning.sweep.workers import oversubscription_warning

    warning = oversubscription_warning({2, None}, workers=2, cores=2)
    assert warning and "trainer.num_threads=2" in warning and "2 workers" in warning and "2 cores" in warning
    assert oversubscription_warning({None}, workers=2, cores=2) is None  # unset: cores // workers each
    assert oversubscription_warning({1}, workers=2, cores=2) is None
    assert oversubscription_warning({2}, workers=1, cores=2) is None


def test_lightning_restating_an_argument_the_suite_set_is_dropped_and_other_notices_kept():
    import logging

    from pc_lightning.library_noise import _not_noise

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "", 0, msg, None, None)

    assert not _not_noise(record("`Trainer(val_check_interval=1)` was configured so validation will run after every "
                                 "batch."))
    assert not _not_noise(record("`Trainer(limit_val_batches=1)` was configured so 1 batch will be used."))
    assert not _not_noise(record("GPU available: False, used: False"))
    assert _not_noise(record("Restoring states from the checkpoint path at last.ckpt"))
