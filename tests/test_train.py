"""End-to-end runs at tiny size: MLflow contents, resume == uninterrupted, failures end the run properly."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from pc_lightning import tracking
from pc_lightning.config import load_config
from pc_lightning.train import train
from conftest import tiny_overrides
from helpers import ROOT, StopAt, assert_same_training_state


def client() -> MlflowClient:
    return MlflowClient(tracking.tracking_uri(tracking.TrackingConfig()))


def final_state(ckpt_dir: str) -> dict:
    return torch.load(os.path.join(ckpt_dir, "last.ckpt"), map_location="cpu", weights_only=False)


class RaiseAt(L.Callback):
    def __init__(self, step: int, exc: BaseException):
        self.step, self.exc = step, exc

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise self.exc


class PoisonAt(L.Callback):
    """Sets one weight to NaN so that the next forward's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head.weight.fill_(float("nan"))


def test_run_is_tracked_in_mlflow(tiny_cfg, tmp_path):
    result = train(tiny_cfg(name="tracked"), quiet=True)
    assert result.status == "finished" and result.step == 6
    run = client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.d_model"] == "32"
    for key in ("train/loss", "val/loss", "val/ppl", "val/unigram_entropy", "perf/tokens_per_sec"):
        assert key in run.data.metrics, key
    artifacts = [a.path for a in client().list_artifacts(result.run_id)]
    assert "config.yaml" in artifacts
    # the logged config re-runs as it is
    path = client().download_artifacts(result.run_id, "config.yaml", str(tmp_path))
    again = train(load_config(path), quiet=True)
    assert again.status == "finished"
    assert again.metrics["val/loss"] == pytest.approx(result.metrics["val/loss"], rel=1e-5)


RESUME_STEPS = 12
RESUME_KEYS = {"trainer.checkpoint_every": 1, "trainer.val_every": 4,
               # a constant learning rate: the schedule must not depend on trainer.max_steps when a resume changes it
               "optim.warmup_fraction": 0, "optim.min_lr_ratio": 1.0}
_uninterrupted: dict[int, dict] = {}


def uninterrupted(tiny_cfg, steps: int) -> dict:
    """last.ckpt of an uninterrupted run of ``steps`` steps (deterministic: computed once per session)."""
    if steps not in _uninterrupted:
        result = train(tiny_cfg(name=f"straight-{steps}", **RESUME_KEYS, **{"trainer.max_steps": steps}), quiet=True)
        assert result.step == steps
        _uninterrupted[steps] = final_state(result.checkpoint_dir)
    return _uninterrupted[steps]


def not_resumable_warnings(recwarn) -> list[str]:
    return [str(w.message) for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.parametrize("stop", [1, RESUME_STEPS // 3, RESUME_STEPS // 2, RESUME_STEPS - 1])
def test_resume_is_bit_identical(tiny_cfg, recwarn, stop):
    """Stopped after step ``stop`` and resumed from last.ckpt, the run ends with exactly the parameters and the
    optimizer state of the uninterrupted run: every step after the resume reads the windows it would have read."""
    straight = uninterrupted(tiny_cfg, RESUME_STEPS)
    keys = {**RESUME_KEYS, "trainer.max_steps": RESUME_STEPS}
    first = train(tiny_cfg(name="split", **keys), extra_callbacks=[StopAt(stop)], quiet=True)
    assert first.step == stop
    resumed = train(tiny_cfg(name="split", **keys), resume="last", quiet=True)
    assert resumed.step == RESUME_STEPS and resumed.run_id == first.run_id  # same MLflow run continues
    assert_same_training_state(straight, final_state(resumed.checkpoint_dir))
    assert not not_resumable_warnings(recwarn)  # Lightning sees a loader that resumes mid-epoch


def test_resume_with_a_larger_max_steps_matches_the_longer_run(tiny_cfg, recwarn):
    """Stopped after step 2 of a 6-step run and resumed with trainer.max_steps=12: the same end state as an
    uninterrupted 12-step run (constant learning rate, so only the data stream could differ)."""
    straight = uninterrupted(tiny_cfg, RESUME_STEPS)
    first = train(tiny_cfg(name="grow", **RESUME_KEYS, **{"trainer.max_steps": 6}), extra_callbacks=[StopAt(2)],
                  quiet=True)
    assert first.step == 2
    resumed = train(tiny_cfg(name="grow", **RESUME_KEYS, **{"trainer.max_steps": RESUME_STEPS}), resume="last",
                    quiet=True)
    assert resumed.step == RESUME_STEPS
    assert_same_training_state(straight, final_state(resumed.checkpoint_dir))
    assert not not_resumable_warnings(recwarn)


def test_resume_may_extend_the_run(tiny_cfg):
    """Resuming a finished run with a larger trainer.max_steps continues the same MLflow run; the first config
    stays its params, the resumed one is kept as an artifact."""
    first = train(tiny_cfg(name="longer"), quiet=True)
    assert first.status == "finished" and first.step == 6
    longer = train(tiny_cfg(name="longer", **{"trainer.max_steps": 9}), resume="last", quiet=True)
    assert longer.status == "finished" and longer.step == 9 and longer.run_id == first.run_id
    run = client().get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "6"
    resumes = [a.path for a in client().list_artifacts(first.run_id, "resumes")]
    assert len(resumes) == 1 and resumes[0].endswith(".yaml")


def test_nan_loss_stops_naming_the_step(tiny_cfg):
    result = train(tiny_cfg(name="nan"), extra_callbacks=[PoisonAt(4)], quiet=True)
    assert result.status == "diverged"
    assert "step 4" in result.message
    run = client().get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"
    assert "train/loss" in run.data.metrics  # metrics so far are kept
    assert glob.glob(os.path.join(result.checkpoint_dir, "*.ckpt"))  # something to resume from


def test_exception_fails_run_and_keeps_checkpoint(tiny_cfg):
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_cfg(name="crash"), extra_callbacks=[RaiseAt(4, RuntimeError("boom"))], quiet=True)
    runs = client().search_runs([client().get_experiment_by_name("pc-lightning").experiment_id],
                                filter_string="tags.`pcl.name` = 'crash'")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["status"] == "failed"
    assert "train/loss" in runs[0].data.metrics
    resumed = train(tiny_cfg(name="crash"), resume="last", quiet=True)
    assert resumed.status == "finished" and resumed.step == 6


def test_ctrl_c_kills_run(tiny_cfg):
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            train(tiny_cfg(name="ctrlc"), extra_callbacks=[RaiseAt(3, KeyboardInterrupt())], quiet=True)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C; give it back
    runs = client().search_runs([client().get_experiment_by_name("pc-lightning").experiment_id],
                                filter_string="tags.`pcl.name` = 'ctrlc'")
    assert runs[0].info.status == "KILLED"
    resumed = train(tiny_cfg(name="ctrlc"), resume="last", quiet=True)
    assert resumed.status == "finished"


@pytest.mark.parametrize("exc, status, tag", [(KeyboardInterrupt(), "KILLED", "killed"),
                                              (OSError("disk full"), "FAILED", "failed")])
def test_stop_between_run_creation_and_training_closes_the_run(tiny_cfg, monkeypatch, exc, status, tag):
    """A Ctrl-C (or an error) after the MLflow run exists but before Lightning's own handling starts, e.g.
    while the config is logged: the run must not stay RUNNING (a sweep killed between trials hit this)."""
    def stopped(*args, **kwargs):
        raise exc

    monkeypatch.setattr("pc_lightning.train._log_config", stopped)
    with pytest.raises(type(exc)):
        train(tiny_cfg(name=f"early-{tag}"), quiet=True)
    runs = client().search_runs([client().get_experiment_by_name("pc-lightning").experiment_id],
                                filter_string=f"tags.`pcl.name` = 'early-{tag}'")
    assert len(runs) == 1 and runs[0].info.status == status and runs[0].data.tags["status"] == tag


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_cfg, data_cache, results_dir, tmp_path):
    """SIGKILL half-way through the write of the step-6 ``last.ckpt`` (tests/checkpoint_worker.py): the step-3
    ``last.ckpt`` stays whole, and ``--resume last`` continues the same MLflow run from it. The system temp
    directory is put on another filesystem (/dev/shm), as on machines with /tmp on tmpfs: Lightning's own
    writer then copies its temp file onto ``last.ckpt`` in place."""
    steps = {"trainer.max_steps": 9, "trainer.val_every": 3, "trainer.checkpoint_every": 3}
    ready = tmp_path / "stalled"
    elsewhere = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env = {**os.environ, "PCL_RESULTS_DIR": str(results_dir), "TMPDIR": elsewhere}
    cmd = [sys.executable, str(ROOT / "tests" / "checkpoint_worker.py"), "--stall-at", "2", "--ready", str(ready),
           "--", "--config", str(ROOT / "conf" / "baseline.yaml"),
           *tiny_overrides(data_cache, results_dir, name="killed", **steps)]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"no second checkpoint: {(tmp_path / 'train.log').read_text()[-3000:]}"
    finally:
        proc.kill()  # SIGKILL, half-way through the write
        proc.wait()
        shutil.rmtree(elsewhere, ignore_errors=True)

    (path,) = glob.glob(str(results_dir / "checkpoints" / "killed" / "*" / "last.ckpt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    resumed = train(tiny_cfg(name="killed", **steps), resume="last", quiet=True)
    assert resumed.status == "finished" and resumed.step == 9 and resumed.run_id == checkpoint["mlflow_run_id"]
    assert client().get_run(resumed.run_id).info.status == "FINISHED"


# bf16-mixed is what GPU runs use by default (trainer.precision: auto); Lightning runs it on CPU too, so every
# layer kind and optimizer family is checked here under it against the same run in fp32.
BF16_CASES = {
    "pc-adamw-accum": {"model.linear": "pc", "trainer.accumulate_grad_batches": 2},
    "tsvd-muon-rank-change": {"model.linear": "tsvd", "optim.name": "muon", "model.tsvd.rank_check_every": 2,
                              "model.tsvd.energy_threshold": 0.6},
    "norms-caps-zloss-soap": {"optim.name": "soap", "model.attn_norm": "qk_norm", "model.attn_softcap": 50.0,
                              "model.logit_softcap": 30.0, "model.post_fc2_norm": True, "model.z_loss": 1e-4},
    # one inner step per outer step: the question here is bf16, not the recipe (four cost minutes on 2 cores)
    "pc-gn": {"model.linear": "pc", "optim.name": "gn", "optim.gn.inner_steps": 1},
}


@pytest.mark.parametrize("case", [pytest.param(case, id=name, marks=[pytest.mark.slow] if name == "pc-gn" else [])
                                  for name, case in BF16_CASES.items()])  # PC under torch.func: minutes on 2 cores
def test_bf16_mixed_run_tracks_the_fp32_run(tiny_cfg, case):
    fp32 = train(tiny_cfg(name="fp32", **{"trainer.precision": "32-true"}, **case), quiet=True)
    bf16 = train(tiny_cfg(name="bf16", **{"trainer.precision": "bf16-mixed"}, **case), quiet=True)
    assert fp32.status == bf16.status == "finished" and bf16.step == fp32.step
    assert bf16.metrics["val/loss"] == pytest.approx(fp32.metrics["val/loss"], rel=5e-3)
    run = client().get_run(bf16.run_id)
    assert run.data.params["trainer.precision"] == "bf16-mixed"
